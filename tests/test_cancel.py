"""Cancelling: a waiting job is taken off its queue, a running one is killed by its worker."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests
from rq.job import Job

from conftest import token


def test_cancel_before_start_revokes_and_the_job_never_runs(gateway, start_worker, redis_db):
    start_worker('sleeper')
    busy = gateway.running('sleeper')
    waiting = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/never.wav')
    answer = gateway.cancel('sleeper', waiting)
    assert answer.status_code == 200
    assert answer.json() == {'uuid': waiting, 'status': 'REVOKED', 'result': {'code': 109, 'message': 'revoked'}}
    gateway.cancel('sleeper', busy)
    gateway.wait_for('sleeper', busy, 'REVOKED')
    assert Job.fetch(waiting, connection=redis_db).started_at is None
    assert gateway.state('sleeper', waiting)['status'] == 'REVOKED'


def test_cancel_while_running_terminates_within_5_seconds(gateway, start_worker):
    start_worker('sleeper')
    uuid = gateway.running('sleeper')
    started = time.monotonic()
    answer = gateway.cancel('sleeper', uuid)
    final, _ = gateway.wait_for('sleeper', uuid, 'REVOKED', timeout=5)
    assert time.monotonic() - started < 5
    assert answer.json()['status'] == 'REVOKED'
    assert final['result'] == {'code': 109, 'message': 'terminated'}


def test_worker_completes_the_next_job_after_a_cancel(gateway, start_worker):
    start_worker('sleeper', 'echo')
    cancelled = gateway.running('sleeper')
    gateway.cancel('sleeper', cancelled)
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS')
    assert final['result'][0]['url'] == 'http://127.0.0.1:9/a.wav'


def test_cancel_of_a_finished_job_changes_nothing(gateway, start_worker):
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS')
    answer = gateway.cancel('echo', uuid)
    assert answer.status_code == 200 and answer.json() == final


def test_cancel_accepts_get(gateway):
    uuid = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/a.wav')
    answer = requests.get(f'{gateway.url}/sleeper/cancel', params={'uuid': uuid},
                          headers={'Authorization': token()}, timeout=10)
    assert answer.status_code == 200 and answer.json()['status'] == 'REVOKED'


def test_head_of_cancel_is_refused_and_cancels_nothing(gateway):
    uuid = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/a.wav')
    answer = requests.head(f'{gateway.url}/sleeper/cancel', params={'uuid': uuid},
                           headers={'Authorization': token()}, timeout=10)
    assert answer.status_code == 405 and answer.headers['Allow'] == 'GET, POST'
    assert gateway.state('sleeper', uuid)['status'] == 'PENDING'


def test_callback_tells_revoked_for_a_job_cancelled_before_start(gateway, web, start_worker):
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav', callback_url=web.url('/callback'))
    gateway.cancel('echo', uuid)
    start_worker('echo')  # the next worker of the service delivers it
    assert web.wait_for_callbacks(1) == [{'uuid': uuid, 'status': 'REVOKED'}]


def test_callback_tells_revoked_for_a_job_cancelled_while_running(gateway, web, start_worker):
    start_worker('sleeper')
    uuid = gateway.running('sleeper', callback_url=web.url('/callback'))
    gateway.cancel('sleeper', uuid)
    assert web.wait_for_callbacks(1) == [{'uuid': uuid, 'status': 'REVOKED'}]


def test_cancel_needs_a_token(gateway):
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    answer = requests.post(f'{gateway.url}/echo/cancel', params={'uuid': uuid}, timeout=10)
    assert answer.status_code == 401 and answer.json()['vesta']['code'] == 208
    assert gateway.state('echo', uuid)['status'] == 'PENDING'


def test_concurrent_cancels_of_a_waiting_job_all_answer_revoked(gateway):
    uuid = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/a.wav')
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: gateway.cancel('sleeper', uuid), range(8)))
    assert [(a.status_code, a.json()['status']) for a in answers] == [(200, 'REVOKED')] * 8
