"""The seed's flow end to end: submit, queue, work, progress, store, status, callback."""

import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree

import pytest
from rq.job import Job

from conftest import Gateway, gateway_on, wait_idle, wait_until, wav_bytes

# 1 s tone, 1 s silence, 1 s tone.
TONE_SILENCE_TONE = [(1, 0.5), (1, 0), (1, 0.5)]


@pytest.fixture
def annotated(gateway, web, start_worker, redis_db):
    """A WAV submitted to the annotator with ann_doc_id and callback_url before any worker
    runs, then followed to SUCCESS; the worker is idle (its callback sent) when this returns."""
    web.documents['speech.wav'] = wav_bytes(TONE_SILENCE_TONE)
    uuid = gateway.submitted('annotator', doc_url=web.url('/docs/speech.wav'), ann_doc_id='doc 42/a',
                             callback_url=web.url('/callback'))
    pending = gateway.state('annotator', uuid)
    worker = start_worker('annotator')
    final, seen = gateway.wait_for('annotator', uuid, 'SUCCESS', 'FAILURE')
    wait_idle(redis_db, worker)
    return uuid, final, [pending, *seen]


def test_submission_answers_202_with_uuid_and_status_location(gateway, web, start_worker):
    answer = gateway.submit('echo', data={'doc_url': web.url('/docs/x.wav')})
    assert answer.status_code == 202
    uuid = answer.json()['uuid']
    assert answer.headers['Location'] == f'{gateway.url}/echo/status?uuid={uuid}'


def test_new_job_is_pending_until_a_worker_takes_it(gateway, web, redis_db):
    uuid = gateway.submitted('echo', doc_url=web.url('/docs/x.wav'))
    assert gateway.state('echo', uuid) == {'uuid': uuid, 'status': 'PENDING',
                                           'result': {'position': 1, 'eta': None}}


def test_seed_flow_goes_pending_progress_success(annotated):
    uuid, final, seen = annotated
    statuses = [state['status'] for state in seen]
    assert final['status'] == 'SUCCESS', final
    assert statuses[0] == 'PENDING' and statuses.index('PROGRESS') < statuses.index('SUCCESS')
    progress = [state['result'] for state in seen if state['status'] == 'PROGRESS']
    assert any(0 < result['current'] < 100 for result in progress)
    assert all(result['total'] == 100 and result['worker_id_version'] == '1.0.0' and result['type'] == 'annotator'
               and result['host'] and result['start_time'].endswith('Z') for result in progress)


def test_annotations_describe_the_wav(annotated):
    _, final, _ = annotated
    audio, *segments = final['result']
    assert audio['type'] == 'audio' and audio['duration'] == 3.0 and audio['sample_rate'] == 8000
    assert [(s['type'], s['start'], s['end']) for s in segments] == [
        ('sound', 0.0, 1.0), ('silence', 1.0, 2.0), ('sound', 2.0, 3.0)]
    assert all(a['@id'] and a['@version'] == '1.0.0' for a in final['result'])


def test_annotation_store_receives_the_annotations_once(annotated, web):
    _, final, _ = annotated
    assert web.stored == [(quote('doc 42/a', safe=''), {'common': {}, 'data': final['result']})]


def test_callback_comes_once_with_success(annotated, web):
    uuid, _, _ = annotated
    assert web.callbacks == [{'uuid': uuid, 'status': 'SUCCESS'}]


def test_received_while_the_document_downloads(gateway, web, start_worker):
    start_worker('small')
    web.documents['doc.bin'] = b'x' * 10
    web.held['doc.bin'] = threading.Event()
    uuid = gateway.submitted('small', doc_url=web.url('/docs/doc.bin'))
    received, _ = gateway.wait_for('small', uuid, 'RECEIVED')
    web.held['doc.bin'].set()
    final, _ = gateway.wait_for('small', uuid, 'SUCCESS')
    assert received['result'] is None and final['result'][0]['size'] == 10


def test_a_download_after_progress_keeps_the_job_in_progress(gateway, web, start_worker):
    start_worker('eager')  # reports 5 %, then downloads
    web.documents['doc.bin'] = b'x' * 10
    web.held['doc.bin'] = threading.Event()
    uuid = gateway.running('eager', doc_url=web.url('/docs/doc.bin'))
    web.held['doc.bin'].set()
    final, seen = gateway.wait_for('eager', uuid, 'SUCCESS')
    assert final['result'][0]['size'] == 10
    assert [state['status'] for state in seen] == ['PROGRESS'] * (len(seen) - 1) + ['SUCCESS']


def test_annotations_of_the_services_own_types_reach_the_client_as_json(gateway, start_worker):
    start_worker('typed')  # returns a float subclass that only the worker knows
    uuid = gateway.submitted('typed', doc_url='http://127.0.0.1:9/a.wav')
    final, _ = gateway.wait_for('typed', uuid, 'SUCCESS', 'FAILURE')
    assert final['result'] == [{'@id': uuid, 'level': 0.5}]


def test_started_while_the_service_runs_without_progress(gateway, start_worker, tmp_path):
    start_worker('held')
    uuid = gateway.submitted('held', doc_url='http://127.0.0.1:9/a.wav', release=str(tmp_path / 'go'))
    started, _ = gateway.wait_for('held', uuid, 'STARTED')
    (tmp_path / 'go').touch()
    final, _ = gateway.wait_for('held', uuid, 'SUCCESS')
    assert started['result'] is None and final['result'][0]['released']


def test_storing_is_reported_while_the_store_is_retried(gateway, web, start_worker):
    start_worker('echo')
    web.store_status = 503  # retried with back-off, long enough to be seen
    uuid = gateway.submitted('echo', doc_url=web.url('/docs/x.wav'), ann_doc_id='slow')
    final, seen = gateway.wait_for('echo', uuid, 'FAILURE')
    storing = [state for state in seen if state['status'] == 'STORING']
    assert storing and set(storing[0]['result']) == {'worker_id_version', 'start_time', 'host', 'type'}
    assert final['result']['code'] == 302
    assert len(web.stored) == 3  # the tests' [storage] retries = 2


def test_storage_doc_id_in_the_path_resolves_through_get_storage_doc_url(gateway, web, start_worker):
    start_worker('echo')
    answer = gateway.submit('echo', route='annotate/abc%201', data={'lang': 'fr'})
    final, _ = gateway.wait_for('echo', answer.json()['uuid'], 'SUCCESS')
    assert final['result'][0]['url'] == web.url('/docs/abc%201')
    assert final['result'][0]['misc'] == {'lang': 'fr'}


def test_storage_x_id_fields_become_x_url_in_misc(gateway, web, start_worker):
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url=web.url('/docs/a.wav'), storage_model_id='m1', speaker='ann')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS')
    assert final['result'][0]['misc'] == {'model_url': web.url('/docs/m1'), 'speaker': 'ann'}


def test_query_fields_and_repeated_fields_reach_misc(gateway, web, start_worker):
    start_worker('echo')
    answer = gateway.submit('echo', params={'doc_url': web.url('/docs/a.wav'), 'lang': 'fr'},
                            data=[('tag', 'a'), ('tag', 'b'), ('name', 'é')])
    final, _ = gateway.wait_for('echo', answer.json()['uuid'], 'SUCCESS')
    assert final['result'][0]['misc'] == {'lang': 'fr', 'tag': ['a', 'b'], 'name': 'é'}


def test_process_delivers_a_nested_json_body_unchanged(gateway, web, start_worker):
    start_worker('echo')
    body = {'doc_url': web.url('/docs/a.wav'), 'options': {'layers': [1, 2, {'deep': None}], 'flag': True},
            'text': 'naïve'}
    answer = gateway.submit('echo', route='process', json=body)
    final, _ = gateway.wait_for('echo', answer.json()['uuid'], 'SUCCESS')
    assert final['result'][0]['misc'] == body
    assert final['result'][0]['url'] == body['doc_url']


def test_process_takes_doc_url_from_the_query_and_a_storage_id_from_the_path(gateway, web, start_worker):
    start_worker('echo')
    answer = gateway.submit('echo', route='process/s9', json={'k': 1})
    final, _ = gateway.wait_for('echo', answer.json()['uuid'], 'SUCCESS')
    assert final['result'][0]['url'] == web.url('/docs/s9')
    answer = gateway.submit('echo', route='process', params={'doc_url': web.url('/docs/q')}, json={'k': 2})
    final, _ = gateway.wait_for('echo', answer.json()['uuid'], 'SUCCESS')
    assert final['result'][0]['url'] == web.url('/docs/q')


def test_noparams_service_needs_no_doc_url(gateway, start_worker):
    start_worker('quiet')
    uuid = gateway.submitted('quiet')
    final, _ = gateway.wait_for('quiet', uuid, 'SUCCESS')
    assert final['result'][0]['url'] is None


def test_status_is_xml_when_the_client_asks_for_it(gateway, web, start_worker):
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url=web.url('/docs/a.wav'), lang='fr')
    gateway.wait_for('echo', uuid, 'SUCCESS')
    answer = gateway.status('echo', uuid, headers={'Accept': 'application/xml'})
    assert answer.headers['Content-Type'].startswith('application/xml')
    job = ElementTree.fromstring(answer.content)
    assert job.tag == 'job' and job.findtext('uuid') == uuid and job.findtext('status') == 'SUCCESS'
    assert job.find('result/item/field[@name="@id"]').text == uuid
    assert job.findtext('result/item/misc/lang') == 'fr'


def test_location_follows_a_trusted_proxy_and_url_prefix(settings_file, redis_server, redis_db, web):
    with gateway_on(settings_file, redis_server, '--url-prefix=/sg', '--trusted-proxy=127.0.0.1',
                    '--trusted-proxy-headers=x-forwarded-host x-forwarded-proto') as proxied:
        answer = Gateway(f'{proxied.url}/sg').submit('echo', data={'doc_url': web.url('/docs/a.wav')}, headers={
            'X-Forwarded-Proto': 'https', 'X-Forwarded-Host': 'gateway.example.org'})
    assert answer.headers['Location'] == f'https://gateway.example.org/sg/echo/status?uuid={answer.json()["uuid"]}'


def test_untrusted_forwarded_headers_are_ignored(gateway, web):
    answer = gateway.submit('echo', data={'doc_url': web.url('/docs/a.wav')}, headers={
        'X-Forwarded-Proto': 'https', 'X-Forwarded-Host': 'evil.example.org'})
    assert answer.headers['Location'].startswith(f'{gateway.url}/echo/status?uuid=')


def test_downloaded_document_is_removed_when_the_job_ends(gateway, web, start_worker):
    start_worker('small')
    web.documents['doc.bin'] = b'x' * 500
    uuid = gateway.submitted('small', doc_url=web.url('/docs/doc.bin'))
    final, _ = gateway.wait_for('small', uuid, 'SUCCESS')
    result = final['result'][0]
    assert result['size'] == 500 and result['path'].endswith('.bin')
    wait_until(lambda: not os.path.exists(os.path.dirname(result['path'])), message='the download to be removed')


def test_downloaded_document_is_removed_when_its_job_is_cancelled(gateway, web, start_worker):
    start_worker('downloader')
    web.documents['doc.bin'] = b'x' * 500
    uuid = gateway.running('downloader', doc_url=web.url('/docs/doc.bin'))
    directory = Path(tempfile.gettempdir(), f'gateway-job-{uuid}')
    assert (directory / 'document.bin').read_bytes() == b'x' * 500
    gateway.cancel('downloader', uuid)
    wait_until(lambda: not directory.exists(), message='the download to be removed')


def test_process_body_is_not_read_as_a_form(gateway, redis_db):
    body = {'doc_url': 'http://127.0.0.1:9/a.wav', 'text': '50%ff off', 'note': 'a&callback_url=http://x.org/&b'}
    answer = gateway.submit('echo', route='process', json=body)
    assert answer.status_code == 202, answer.text
    job = Job.fetch(answer.json()['uuid'], connection=redis_db)
    assert job.meta['callback_url'] is None and job.args[0]['service']['misc'] == body
