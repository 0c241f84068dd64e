"""Bad input gets a clear error with its code (SPEC section 6), and nothing is queued."""

import pytest
import requests
from rq.job import Job

from conftest import gateway_on, wait_until, wav_bytes, write_settings


def vesta(answer):
    return answer.status_code, answer.json()['vesta']['code']


def test_unknown_service_is_404_202(gateway):
    assert vesta(gateway.submit('nosuch', data={'doc_url': 'http://127.0.0.1:9/a.wav'})) == (404, 202)
    assert vesta(gateway.status('nosuch', 'x')) == (404, 202)


def test_unknown_route_is_404_202(gateway):
    assert vesta(requests.get(f'{gateway.url}/echo/nosuch', timeout=10)) == (404, 202)


def test_wrong_method_is_405(gateway):
    answer = requests.get(f'{gateway.url}/echo/annotate', timeout=10)
    assert vesta(answer) == (405, 202) and answer.headers['Allow'] == 'POST'


@pytest.mark.parametrize('route', ['annotate', 'process'])
def test_empty_optional_fields_are_taken_as_absent(gateway, redis_db, route):
    fields = {'doc_url': 'http://127.0.0.1:9/a.wav', 'storage_doc_id': '', 'ann_doc_id': '', 'callback_url': ''}
    answer = gateway.submit('echo', route=route, **({'json': fields} if route == 'process' else {'data': fields}))
    assert answer.status_code == 202, answer.text
    job = Job.fetch(answer.json()['uuid'], connection=redis_db)
    message = job.args[0]
    assert message['service']['document']['url'] == 'http://127.0.0.1:9/a.wav'
    assert message['annotation_service']['url'] is None and not job.meta.get('callback_url')


def test_missing_doc_url_is_400_206(gateway, redis_db):
    assert vesta(gateway.submit('echo', data={'lang': 'fr'})) == (400, 206)
    assert redis_db.llen('rq:queue:echo') == 0


@pytest.mark.parametrize('doc_url', ['ftp://x/y', 'not a url', 'http://', 'file:///etc/passwd',
                                     'http://exa mple.org/a.wav', 'http://[::1/a.wav', 'http://[zz]/a.wav',
                                     'http://a..b/x', 'http://h:99999/x', 'http://h:abc/x'])
def test_doc_url_that_is_not_http_is_400_207(gateway, doc_url):
    assert vesta(gateway.submit('echo', data={'doc_url': doc_url})) == (400, 207)


def test_every_url_field_is_checked(gateway):
    fields = {'doc_url': 'http://127.0.0.1:9/a.wav'}
    assert vesta(gateway.submit('echo', data={**fields, 'callback_url': 'gopher://x'})) == (400, 207)
    assert vesta(gateway.submit('echo', data={**fields, 'model_url': 'nope'})) == (400, 207)


def test_doc_url_and_a_storage_id_together_are_400_207(gateway):
    answer = gateway.submit('echo', data={'doc_url': 'http://127.0.0.1:9/a.wav', 'storage_doc_id': 'x'})
    assert vesta(answer) == (400, 207)


def test_storage_field_without_storage_settings_is_500_200(redis_server, redis_db, tmp_path, web):
    with gateway_on(write_settings(tmp_path / 'settings.ini', web, storage=False), redis_server) as gateway:
        with_store = gateway.submit('echo', data={'doc_url': 'http://127.0.0.1:9/a.wav', 'ann_doc_id': 'x'})
        with_storage_id = gateway.submit('echo', route='annotate/x')
    assert vesta(with_store) == (500, 200) and 'post_annotations_url' in with_store.json()['vesta']['message']
    assert vesta(with_storage_id) == (500, 200)


def test_process_with_broken_json_is_400_210(gateway):
    assert vesta(gateway.submit('echo', route='process', data='{"doc_url": ')) == (400, 210)


@pytest.mark.parametrize('depth', [600, 2000])  # beyond what RQ can pickle; beyond what json can parse
def test_process_with_json_nested_too_deeply_is_400_210(gateway, redis_db, depth):
    body = '{"doc_url": "http://127.0.0.1:9/a.wav", "deep": ' + '[' * depth + ']' * depth + '}'
    assert vesta(gateway.submit('echo', route='process', data=body)) == (400, 210)
    assert redis_db.llen('rq:queue:echo') == 0


@pytest.mark.parametrize('constant', ['NaN', 'Infinity', '-Infinity', '1e999', '-1e400'])
def test_process_with_a_number_json_does_not_have_is_400_210(gateway, constant):
    body = '{"doc_url": "http://127.0.0.1:9/a.wav", "threshold": %s}' % constant
    assert vesta(gateway.submit('echo', route='process', data=body)) == (400, 210)


def test_process_with_a_json_list_is_400_210(gateway):
    assert vesta(gateway.submit('echo', route='process', json=['http://127.0.0.1:9/a.wav'])) == (400, 210)


@pytest.mark.parametrize('route', ['annotate', 'process'])
def test_body_over_the_limit_is_413_209(gateway, route):
    answer = gateway.submit('echo', route=route, data='x' * 5000)  # the tests' limit is 4096 bytes
    assert vesta(answer) == (413, 209)


def test_chunked_body_over_the_limit_is_413_209(gateway):
    # waitress joins the chunks and sets Content-Length, which the gateway checks first
    answer = gateway.submit('echo', data=(b'doc_url=http://x/' + b'y' * 100 for _ in range(60)))
    assert vesta(answer) == (413, 209)


def test_missing_uuid_is_400_206(gateway):
    assert vesta(requests.get(f'{gateway.url}/echo/status', timeout=10)) == (400, 206)


@pytest.mark.parametrize('uuid', ['nope', '00000000-0000-4000-8000-000000000000'])
def test_unknown_uuid_is_404_203(gateway, uuid):
    assert vesta(gateway.status('echo', uuid)) == (404, 203)


def test_uuid_of_another_service_is_404_203(gateway):
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    assert vesta(gateway.status('sleeper', uuid)) == (404, 203)
    assert vesta(gateway.cancel('sleeper', uuid)) == (404, 203)
    assert gateway.state('echo', uuid)['status'] == 'PENDING'


def test_issued_uuid_whose_job_expired_is_expired(gateway, redis_db, start_worker):
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    gateway.wait_for('echo', uuid, 'SUCCESS')
    redis_db.delete(f'rq:job:{uuid}')  # what result_ttl does in time
    assert gateway.state('echo', uuid) == {'uuid': uuid, 'status': 'EXPIRED', 'result': None}


def test_worker_of_another_version_is_500_204(gateway, web, start_worker, tmp_path):
    old_version = write_settings(tmp_path / 'old.ini', web, services={'annotator': {'version': '0.9.0'}})
    start_worker('annotator', settings=old_version)
    web.documents['a.wav'] = wav_bytes([(3, 0.5)])
    uuid = gateway.submitted('annotator', doc_url=web.url('/docs/a.wav'))

    def mismatch():
        answer = gateway.status('annotator', uuid)
        return answer.status_code == 500 and answer.json()['vesta']['code'] == 204

    wait_until(mismatch, timeout=20, message='the version mismatch')


def test_error_is_html_when_the_client_prefers_html(gateway):
    answer = gateway.status('nosuch', 'x', headers={'Accept': 'text/html,application/xhtml+xml,*/*;q=0.8'})
    assert answer.status_code == 404 and answer.headers['Content-Type'].startswith('text/html')
    assert 'unknown service' in answer.text and 'Traceback' not in answer.text


def test_error_is_json_for_any_media_type(gateway):
    answer = gateway.status('nosuch', 'x', headers={'Accept': '*/*'})
    assert answer.json() == {'status': 404, 'description': 'Not Found',
                             'vesta': {'code': 202, 'message': "unknown service 'nosuch'"}}
