"""Operators' views: the home page, /metrics and rq-dashboard, all read from RQ's own records."""

import os
import shutil
import subprocess
import sys

import pytest
import requests
from rq import Queue

from conftest import NOWHERE, free_port, scrape, stop, wait_idle, wait_until


@pytest.fixture
def held_states(gateway, start_worker, held_job, redis_db):
    """Jobs of the echo/crash/held services in every state: finished, failed, running, queued."""
    worker = start_worker('echo', 'crash')
    for service in ('echo', 'echo', 'crash'):
        gateway.wait_for(service, gateway.submitted(service, doc_url=NOWHERE), 'SUCCESS', 'FAILURE')
    wait_idle(redis_db, worker)
    start_worker('held')
    held_job()
    for _ in range(2):
        held_job(started=False)


def test_metrics_match_rqs_registries_at_that_moment(gateway, held_states, redis_db):
    redis_db.zadd('rq:finished:echo', {'long-expired-job': 1000})  # what RQ's next cleanup drops
    metrics = scrape(gateway.url)
    for service in ('echo', 'crash', 'held'):
        queue = Queue(service, connection=redis_db)
        held = {'queued': queue.count,
                'started': queue.started_job_registry.count,  # RQ's counts, after its cleanup
                'failed': queue.failed_job_registry.count,
                'finished': queue.finished_job_registry.count}
        scraped = {state: metrics[('gateway_jobs', (('service', service), ('state', state)))] for state in held}
        assert scraped == held, service
    assert (metrics[('gateway_jobs', (('service', 'held'), ('state', 'queued')))],
            metrics[('gateway_jobs', (('service', 'held'), ('state', 'started')))]) == (2, 1)
    assert metrics[('gateway_workers', (('service', 'echo'),))] == 1
    assert metrics[('gateway_workers_busy', (('service', 'held'),))] == 1
    assert metrics[('gateway_submissions_total', (('service', 'echo'),))] == 2
    assert metrics[('gateway_submissions_total', (('service', 'held'),))] == 3


def test_metrics_count_job_durations(gateway, start_worker, redis_db):
    worker = start_worker('echo')
    for _ in range(3):
        gateway.wait_for('echo', gateway.submitted('echo', doc_url=NOWHERE), 'SUCCESS')
    wait_idle(redis_db, worker)
    metrics = scrape(gateway.url)
    labels = (('service', 'echo'),)
    assert metrics[('gateway_job_duration_seconds_count', labels)] == 3
    assert metrics[('gateway_job_duration_seconds_bucket', (('le', '+Inf'), ('service', 'echo')))] == 3
    assert 0 < metrics[('gateway_job_duration_seconds_sum', labels)] < 3


def test_metrics_answer_503_when_redis_is_down(gateway, stopped_redis):
    assert requests.get(f'{gateway.url}/metrics', timeout=10).status_code == 503


def test_home_page_shows_each_service_with_live_figures(gateway, held_states):
    page = requests.get(f'{gateway.url}/', timeout=10)
    assert page.status_code == 200 and page.headers['Content-Type'].startswith('text/html')
    held = page.text.split('id="held"')[1].split('</section>')[0]
    assert '<b>2</b><span>queued</span>' in held and '<b>1</b><span>running</span>' in held
    assert '<b>1</b><span>workers (1 busy)</span>' in held
    assert '<b>3</b><span>invocations</span>' in held and 'href="/held/info"' in held
    echo = page.text.split('id="echo"')[1].split('</section>')[0]
    assert 'Returns what it received' in echo and '<b>1</b><span>workers (0 busy)</span>' in echo


def chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.mark.skipif(not chromium() and not os.environ.get('CI'), reason='needs chromium (.ci/run installs it)')
def test_home_page_loads_in_a_headless_browser(gateway, held_states, tmp_path):
    done = subprocess.run(
        [chromium() or 'chromium', '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         f'--user-data-dir={tmp_path / "chromium"}', '--dump-dom', f'{gateway.url}/'],
        capture_output=True, text=True, timeout=60)
    dom = done.stdout
    assert 'Service Gateway under test' in dom
    assert all(f'id="{service}"' in dom for service in ('annotator', 'echo', 'held'))
    assert '<b>2</b><span>queued</span>' in dom.split('id="held"')[1]


@pytest.fixture
def dashboard(redis_server, redis_db):
    port = free_port()
    process = subprocess.Popen([sys.executable, '-m', 'rq_dashboard', '--redis-url', redis_server.url, '--port',
                                str(port), '--bind', '127.0.0.1'], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f'http://127.0.0.1:{port}'

    def answers():
        try:
            return requests.get(f'{url}/0/data/queues.json', timeout=2).status_code == 200
        except requests.ConnectionError:
            return process.poll() is not None
    wait_until(answers, timeout=30, message='rq-dashboard')
    assert process.poll() is None, 'rq-dashboard did not start'
    yield url
    stop(process)


def test_rq_dashboard_shows_the_queues_of_live_workers_before_any_job(gateway, dashboard, start_worker):
    start_worker('echo', 'crash')
    queues = requests.get(f'{dashboard}/0/data/queues.json', timeout=10).json()['queues']
    assert {(queue['name'], queue['count']) for queue in queues} == {('echo', 0), ('crash', 0)}


def test_rq_dashboard_shows_the_service_queues_and_a_submitted_job(gateway, dashboard):
    uuid = gateway.submitted('echo', doc_url=NOWHERE)
    queues = requests.get(f'{dashboard}/0/data/queues.json', timeout=10).json()['queues']
    assert {'name': 'echo', 'count': 1}.items() <= next(q for q in queues if q['name'] == 'echo').items()
    jobs = requests.get(f'{dashboard}/0/data/jobs/echo/queued/10/asc/1.json', timeout=10).json()['jobs']
    assert [job['id'] for job in jobs] == [uuid]
    job = requests.get(f'{dashboard}/0/data/job/{uuid}.json', timeout=10).json()
    assert job['id'] == uuid and job['origin'] == 'echo'
