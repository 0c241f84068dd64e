"""A waiting job tells its place in the queue and when it should start; a running one when it
should end. Null where a figure is unknown, never a made-up number."""

import threading
import time

from conftest import record_durations, wait_until


def test_position_counts_from_1_for_the_next_job(gateway, redis_db):
    uuids = gateway.waiting('echo', 3)
    assert [gateway.state('echo', uuid)['result']['position'] for uuid in uuids] == [1, 2, 3]


def test_eta_is_null_without_live_workers(gateway, redis_db):
    record_durations(redis_db, 'echo', 10)
    uuid, = gateway.waiting('echo', 1)
    assert gateway.state('echo', uuid)['result'] == {'position': 1, 'eta': None}


def test_eta_is_null_without_duration_history(gateway, start_worker, held_job):
    start_worker('held')
    held_job()
    uuid, = gateway.waiting('held', 1)
    assert gateway.state('held', uuid)['result'] == {'position': 1, 'eta': None}


def test_eta_shares_the_jobs_ahead_among_live_workers(gateway, start_worker, held_job, redis_db):
    record_durations(redis_db, 'held', 10, 20)  # mean 15 s
    for _ in range(2):  # two workers, both busy
        start_worker('held')
    for _ in range(2):
        held_job()
    uuids = gateway.waiting('held', 3)
    # position p starts after p jobs end; two workers end one every 15 / 2 s: eta = p * 15 / 2
    assert [gateway.state('held', uuid)['result'] for uuid in uuids] == [
        {'position': 1, 'eta': 7.5}, {'position': 2, 'eta': 15.0}, {'position': 3, 'eta': 22.5}]


def test_progress_eta_keeps_the_pace_since_the_first_progress_report(gateway, web, start_worker, tmp_path):
    start_worker('stepper')  # downloads, reports 10 %, and 20 % once released
    web.documents['doc.bin'] = b'x'
    web.held['doc.bin'] = threading.Event()
    uuid = gateway.submitted('stepper', doc_url=web.url('/docs/doc.bin'), release=str(tmp_path / 'go'))
    gateway.wait_for('stepper', uuid, 'RECEIVED')
    time.sleep(2)  # a slow download, which the pace must leave out
    downloaded = time.monotonic()
    web.held['doc.bin'].set()
    first, _ = gateway.wait_for('stepper', uuid, 'PROGRESS')
    first_seen = time.monotonic()
    (tmp_path / 'go').touch()
    wait_until(lambda: gateway.state('stepper', uuid)['result']['current'] == 20, message='20 %')
    before = time.monotonic()
    state = gateway.state('stepper', uuid)
    after = time.monotonic()
    assert first['result']['current'] == 10 and first['result']['eta'] is None  # one report: no pace yet
    # 10 % took t since the report of 10 %, which came between `downloaded` and `first_seen`:
    # the last 80 % take 8 t. Counted from the start, the 2 s download would make it 4 (2 + t) or more.
    assert 8 * (before - first_seen) - 0.1 <= state['result']['eta'] <= 8 * (after - downloaded) + 0.1
    gateway.cancel('stepper', uuid)
