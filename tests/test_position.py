"""A waiting job tells its place in the queue and when it should start; a running one when it
should end. Null where a figure is unknown, never a made-up number."""

from datetime import datetime, timezone

from rq.job import Job

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


def test_progress_eta_keeps_the_pace_since_the_job_started(gateway, start_worker, redis_db):
    start_worker('sleeper')  # reports 1 %, then runs
    uuid = gateway.submitted('sleeper', doc_url='http://127.0.0.1:9/a.wav')
    gateway.wait_for('sleeper', uuid, 'PROGRESS')
    before = datetime.now(timezone.utc)
    state = gateway.state('sleeper', uuid)
    after = datetime.now(timezone.utc)
    started = Job.fetch(uuid, connection=redis_db).started_at
    # 1 % done after t seconds: 99 % more take 99 t
    assert 99 * (before - started).total_seconds() - 0.1 <= state['result']['eta'] <= \
        99 * (after - started).total_seconds() + 0.1
    gateway.cancel('sleeper', uuid)
