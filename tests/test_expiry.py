"""Every ended job expires after result_ttl; its uuid record outlives it, so it then reads EXPIRED."""

import pytest

RESULT_TTL, UUID_TTL = 600, 1200  # the tests' settings (conftest.py)


def assert_expiries(redis_db, uuid):
    job_ttl, uuid_ttl = redis_db.ttl(f'rq:job:{uuid}'), redis_db.ttl(f'gateway:uuid:{uuid}')
    assert 0 < job_ttl <= RESULT_TTL < uuid_ttl <= UUID_TTL


@pytest.mark.parametrize('service, status', [('echo', 'SUCCESS'), ('crash', 'FAILURE')])
def test_ended_job_expires_before_its_uuid_record(gateway, start_worker, redis_db, service, status):
    start_worker(service)
    uuid = gateway.submitted(service, doc_url='http://127.0.0.1:9/a.wav')
    gateway.wait_for(service, uuid, status)
    assert_expiries(redis_db, uuid)


def test_job_revoked_before_start_expires_before_its_uuid_record(gateway, redis_db):
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    gateway.cancel('echo', uuid)
    assert_expiries(redis_db, uuid)


def test_job_terminated_expires_before_its_uuid_record(gateway, start_worker, redis_db):
    start_worker('sleeper')
    uuid = gateway.running('sleeper')
    gateway.cancel('sleeper', uuid)
    gateway.wait_for('sleeper', uuid, 'REVOKED')
    assert_expiries(redis_db, uuid)
