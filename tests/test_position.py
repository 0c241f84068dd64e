"""A waiting job tells its place in the queue and when it should start; a running one when it
should end. Null where a figure is unknown, never a made-up number."""

from records import record_duration


def waiting(gateway, service, count):
    return [gateway.submitted(service, doc_url='http://127.0.0.1:9/a.wav') for _ in range(count)]


def test_position_counts_from_1_for_the_next_job(gateway, redis_db):
    uuids = waiting(gateway, 'echo', 3)
    assert [gateway.state('echo', uuid)['result']['position'] for uuid in uuids] == [1, 2, 3]


def test_eta_is_null_without_live_workers(gateway, redis_db):
    with redis_db.pipeline() as pipe:
        record_duration(pipe, 'echo', 10)
        pipe.execute()
    uuid, = waiting(gateway, 'echo', 1)
    assert gateway.state('echo', uuid)['result'] == {'position': 1, 'eta': None}


def test_eta_is_null_without_duration_history(gateway, start_worker, tmp_path, redis_db):
    start_worker('held')
    gateway.wait_for('held', gateway.submitted('held', doc_url='http://127.0.0.1:9/a.wav',
                                               release=str(tmp_path / 'go')), 'STARTED')
    uuid, = waiting(gateway, 'held', 1)
    assert gateway.state('held', uuid)['result'] == {'position': 1, 'eta': None}
    (tmp_path / 'go').touch()


def test_eta_shares_the_jobs_ahead_among_live_workers(gateway, start_worker, tmp_path, redis_db):
    with redis_db.pipeline() as pipe:
        for seconds in (10, 20):  # mean 15 s
            record_duration(pipe, 'held', seconds)
        pipe.execute()
    for _ in range(2):  # two workers, both busy
        start_worker('held')
    for _ in range(2):
        gateway.wait_for('held', gateway.submitted('held', doc_url='http://127.0.0.1:9/a.wav',
                                                   release=str(tmp_path / 'go')), 'STARTED')
    uuids = waiting(gateway, 'held', 3)
    # position p starts after p jobs end; two workers end one every 15 / 2 s: eta = p * 15 / 2
    assert [gateway.state('held', uuid)['result'] for uuid in uuids] == [
        {'position': 1, 'eta': 7.5}, {'position': 2, 'eta': 15.0}, {'position': 3, 'eta': 22.5}]
    (tmp_path / 'go').touch()


def test_progress_carries_an_eta_once_progress_is_reported(gateway, start_worker):
    start_worker('sleeper')  # reports 1 %, then runs
    uuid = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/a.wav')
    state, _ = gateway.wait_for('sleeper', uuid, 'PROGRESS')
    assert state['result']['current'] == 1 and state['result']['eta'] >= 0
    gateway.cancel('sleeper', uuid)
