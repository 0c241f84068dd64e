"""Failures are answers: FAILURE with the code of SPEC section 6, RETRY while a retry is due."""

import threading
import time

import pytest
from rq.job import Job

from conftest import wait_idle, wav_bytes
from worker import ServiceError


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


@pytest.mark.parametrize('error, code', [('RuntimeError', 306), ('TypeError', 104), ('ValueError', 105),
                                         ('OSError', 107), ('KeyError', 108)])
def test_exception_of_the_service_fails_with_its_code(gateway, start_worker, error, code):
    start_worker('crash')
    result = failure_of(gateway, 'crash', doc_url='http://127.0.0.1:9/a.wav', error=error)
    assert result['code'] == code and result['message'].startswith(f'{error}: ')


def test_service_process_killed_goes_retry_then_failure_306(gateway, start_worker):
    start_worker('die')
    uuid = gateway.submitted('die', doc_url='http://127.0.0.1:9/a.wav')
    final, seen = gateway.wait_for('die', uuid, 'FAILURE')
    retry = [state['result'] for state in seen if state['status'] == 'RETRY']
    assert retry and retry[0]['code'] == 306 and 'ended unexpectedly' in retry[0]['message']
    assert final['result']['code'] == 306


def test_document_slower_than_download_timeout_fails_with_301(gateway, web, start_worker):
    start_worker('slowdoc')
    web.documents['slow.bin'] = b'x' * 400  # 20 s at the trickle's pace
    web.trickled.add('slow.bin')
    started = time.monotonic()
    result = failure_of(gateway, 'slowdoc', doc_url=web.url('/docs/slow.bin'))
    assert result['code'] == 301 and 'longer than 1 s' in result['message']
    assert time.monotonic() - started < 10


def test_document_server_that_never_answers_fails_301_within_the_time_limit(gateway, web, start_worker, redis_db):
    start_worker('slowdoc')  # download_timeout = 1
    web.documents['mute.bin'] = b'x'
    web.held['mute.bin'] = threading.Event()  # no headers until the test ends
    uuid = gateway.submitted('slowdoc', doc_url=web.url('/docs/mute.bin'))
    final, _ = gateway.wait_for('slowdoc', uuid, 'FAILURE', 'SUCCESS')
    assert final['result']['code'] == 301
    job = Job.fetch(uuid, connection=redis_db)
    # three attempts of 1/3 s and urllib3's back-off of 0 s, then 1 s: 2 s (each attempt of 1 s: 4 s)
    assert (job.ended_at - job.started_at).total_seconds() < 3


def test_service_may_fail_with_a_code_of_its_own(gateway, start_worker):
    start_worker('custom')
    result = failure_of(gateway, 'custom', doc_url='http://127.0.0.1:9/a.wav')
    assert result == {'code': 601, 'message': 'no speech found'}


def test_own_codes_of_a_service_start_at_600():
    with pytest.raises(ValueError, match='start at 600'):
        ServiceError('not a document', code=305)


def test_service_over_its_timeout_fails_with_306(gateway, start_worker):
    start_worker('overtime')
    result = failure_of(gateway, 'overtime', doc_url='http://127.0.0.1:9/a.wav')
    assert result['code'] == 306 and 'timeout of 1 s' in result['message']


def test_annotation_store_down_fails_with_302_after_its_retries(gateway, web, start_worker):
    start_worker('echo')
    web.stop_store()
    started = time.monotonic()
    result = failure_of(gateway, 'echo', doc_url='http://127.0.0.1:9/a.wav', ann_doc_id='d1')
    assert result['code'] == 302 and 'Connection refused' in result['message']
    assert time.monotonic() - started > 1  # two retries, 0 s and 1 s apart (urllib3's back-off)


def test_annotation_store_that_times_out_is_retried(gateway, web, start_worker):
    start_worker('echo')
    web.store_stalls = 1  # the first post gets no answer within the tests' [storage] timeout = 2
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav', ann_doc_id='d1')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS', 'FAILURE')
    assert final['status'] == 'SUCCESS'
    assert web.stored == [('d1', {'common': {}, 'data': final['result']})] * 2


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


def test_job_waiting_for_its_retry_keeps_nothing_of_the_failed_attempts_progress(gateway, start_worker, tmp_path,
                                                                                 redis_db):
    start_worker('flaky')  # reports 50 %, fails once, retried 2 s later
    uuid = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'marker'))
    gateway.wait_for('flaky', uuid, 'RETRY')
    meta = Job.fetch(uuid, connection=redis_db).meta
    assert (meta['phase'], meta['progress'], meta['progress_from']) == (None, None, None)
    assert meta['failure']['code'] == 107


def test_cancel_of_a_job_waiting_for_its_retry_revokes_it_for_good(gateway, start_worker, tmp_path):
    start_worker('flaky')  # fails once, retried 2 s later
    uuid = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'first'))
    gateway.wait_for('flaky', uuid, 'RETRY')
    answer = gateway.cancel('flaky', uuid)
    assert answer.json()['result'] == {'code': 109, 'message': 'revoked'}
    # A later job's retry comes due after the cancelled one's would have: once it has run, so
    # would the cancelled one have.
    later = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'later'))
    gateway.wait_for('flaky', later, 'SUCCESS')
    assert gateway.state('flaky', uuid)['status'] == 'REVOKED'


def test_callback_tells_failure(gateway, web, start_worker, redis_db):
    worker = start_worker('crash')
    uuid = gateway.submitted('crash', doc_url='http://127.0.0.1:9/a.wav', callback_url=web.url('/callback'))
    gateway.wait_for('crash', uuid, 'FAILURE')
    wait_idle(redis_db, worker)
    assert web.callbacks == [{'uuid': uuid, 'status': 'FAILURE'}]


def test_callback_waits_for_the_last_retry(gateway, web, start_worker, tmp_path, redis_db):
    worker = start_worker('flaky')
    uuid = gateway.submitted('flaky', doc_url='http://127.0.0.1:9/a.wav', marker=str(tmp_path / 'marker'),
                             callback_url=web.url('/callback'))
    gateway.wait_for('flaky', uuid, 'SUCCESS')
    wait_idle(redis_db, worker)
    assert web.callbacks == [{'uuid': uuid, 'status': 'SUCCESS'}]


def test_unusable_callback_url_does_not_change_the_outcome(gateway, start_worker, redis_db):
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav', callback_url='http://127.0.0.1:9/gone')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS', 'FAILURE')
    assert final['status'] == 'SUCCESS'
