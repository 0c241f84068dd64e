"""When Redis is down or hung the gateway answers 503/205 at once, and recovers by itself."""

import time

import pytest


def timed(call):
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


@pytest.mark.parametrize('redis_state', ['stopped_redis', 'hung_redis'])
def test_submit_answers_503_205_within_2_seconds(gateway, request, redis_state):
    request.getfixturevalue(redis_state)
    answer, seconds = timed(lambda: gateway.submit('echo', data={'doc_url': 'http://127.0.0.1:9/a.wav'}))
    assert (answer.status_code, answer.json()['vesta']['code']) == (503, 205)
    assert seconds < 2


@pytest.mark.parametrize('redis_state', ['stopped_redis', 'hung_redis'])
def test_status_answers_503_205_within_2_seconds(gateway, request, redis_state):
    request.getfixturevalue(redis_state)
    answer, seconds = timed(lambda: gateway.status('echo', '00000000-0000-4000-8000-000000000000'))
    assert (answer.status_code, answer.json()['vesta']['code']) == (503, 205)
    assert seconds < 2


def test_gateway_serves_again_once_redis_is_back(gateway, redis_server, redis_db, start_worker):
    gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')  # the gateway holds live connections
    redis_server.stop()
    assert gateway.submit('echo', data={'doc_url': 'http://127.0.0.1:9/a.wav'}).status_code == 503
    redis_server.start()
    start_worker('echo')
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS')
    assert final['result'][0]['url'] == 'http://127.0.0.1:9/a.wav'


def test_worker_resumes_once_redis_is_back(gateway, redis_server, start_worker):
    start_worker('echo')
    gateway.wait_for('echo', gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav'), 'SUCCESS')
    redis_server.stop()
    redis_server.start()
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    final, _ = gateway.wait_for('echo', uuid, 'SUCCESS', timeout=30)
    assert final['status'] == 'SUCCESS'
