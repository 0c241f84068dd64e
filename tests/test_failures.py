"""Failures are answers: FAILURE with the code of SPEC section 6, RETRY while a retry is due."""

from conftest import wav_bytes


def failure_of(gateway, service, **fields):
    uuid = gateway.submitted(service, **fields)
    final, seen = gateway.wait_for(service, uuid, 'FAILURE', 'SUCCESS')
    assert final['status'] == 'FAILURE', final
    return final['result']


def test_document_that_is_not_found_fails_with_301(gateway, web, start_worker):
    start_worker('annotator')
    result = failure_of(gateway, 'annotator', doc_url=web.url('/docs/missing.wav'))
    assert result['code'] == 301 and 'HTTP 404' in result['message']


def test_document_server_that_is_down_fails_with_301(gateway, start_worker):
    start_worker('annotator')
    assert failure_of(gateway, 'annotator', doc_url='http://127.0.0.1:9/a.wav')['code'] == 301


def test_document_over_the_size_limit_fails_with_301(gateway, web, start_worker):
    start_worker('small')
    web.documents['big.bin'] = b'x' * 2000
    result = failure_of(gateway, 'small', doc_url=web.url('/docs/big.bin'))
    assert result['code'] == 301 and '1000 bytes' in result['message']


def test_document_that_is_not_a_wav_fails_with_305(gateway, web, start_worker):
    start_worker('annotator')
    web.documents['notes.txt'] = b'these are not samples'
    result = failure_of(gateway, 'annotator', doc_url=web.url('/docs/notes.txt'))
    assert result['code'] == 305 and 'WAV' in result['message']


def test_bad_service_parameter_fails_with_105(gateway, web, start_worker):
    start_worker('annotator')
    web.documents['a.wav'] = wav_bytes([(0.5, 0.5)])
    result = failure_of(gateway, 'annotator', doc_url=web.url('/docs/a.wav'), window='wide')
    assert result['code'] == 105 and 'window' in result['message']


def test_service_that_raises_fails_with_306(gateway, start_worker):
    start_worker('crash')
    result = failure_of(gateway, 'crash', doc_url='http://127.0.0.1:9/a.wav')
    assert result == {'code': 306, 'message': 'RuntimeError: the service broke'}


def test_service_may_fail_with_a_code_of_its_own(gateway, start_worker):
    start_worker('custom')
    result = failure_of(gateway, 'custom', doc_url='http://127.0.0.1:9/a.wav')
    assert result == {'code': 601, 'message': 'no speech found'}


def test_service_over_its_timeout_fails_with_306(gateway, start_worker):
    start_worker('overtime')
    result = failure_of(gateway, 'overtime', doc_url='http://127.0.0.1:9/a.wav')
    assert result['code'] == 306 and 'timeout of 1 s' in result['message']


def test_annotation_store_down_fails_with_302_after_its_retries(gateway, web, start_worker):
    start_worker('echo')
    web.stop_store()
    result = failure_of(gateway, 'echo', doc_url='http://127.0.0.1:9/a.wav', ann_doc_id='d1')
    assert result['code'] == 302 and 'Max retries exceeded' in result['message']


def test_annotation_store_refusal_fails_with_302(gateway, web, start_worker):
    start_worker('echo')
    web.store_status = 400
    result = failure_of(gateway, 'echo', doc_url='http://127.0.0.1:9/a.wav', ann_doc_id='d1')
    assert result['code'] == 302 and 'HTTP 400' in result['message']
    assert len(web.stored) == 1  # a refusal is final, not retried


def test_service_that_fails_once_with_one_retry_goes_retry_then_success(gateway, start_worker, tmp_path):
    start_worker('flaky')
    uuid = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'marker'))
    final, seen = gateway.wait_for('flaky', uuid, 'SUCCESS', 'FAILURE')
    assert final['status'] == 'SUCCESS' and final['result'][0]['attempt'] == 2
    retry = [state['result'] for state in seen if state['status'] == 'RETRY']
    assert retry and retry[0] == {'code': 107, 'message': 'ConnectionError: the first attempt fails'}


def test_callback_tells_failure(gateway, web, start_worker):
    start_worker('crash')
    uuid = gateway.submitted('crash', doc_url='http://127.0.0.1:9/a.wav', callback_url=web.url('/callback'))
    assert web.wait_for_callbacks(1) == [{'uuid': uuid, 'status': 'FAILURE'}]


def test_callback_waits_for_the_last_retry(gateway, web, start_worker, tmp_path):
    start_worker('flaky')
    uuid = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'marker'),
                             callback_url=web.url('/callback'))
    gateway.wait_for('flaky', uuid, 'SUCCESS')
    assert web.wait_for_callbacks(1) == [{'uuid': uuid, 'status': 'SUCCESS'}]
