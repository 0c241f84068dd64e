"""capacity.py against a real Redis whose queues, workers and records hold known figures."""

import json
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from capacity import load_of, plan, read_figures
from conftest import ROOT, gateway_on, process_env, record_durations, scrape, stop, wait_until, write_settings
from records import record_submission
from settings import load_settings


def run_capacity(settings, redis_server, *args, **environ):
    """``python capacity.py ARGS`` run to its end, with ``environ`` in its environment (None: left out)."""
    return subprocess.run([sys.executable, 'capacity.py', *args], cwd=ROOT, capture_output=True, text=True,
                          env=process_env(settings, redis_server, **environ), timeout=30)


def capacity(settings, redis_server, *args):
    """What ``python capacity.py ARGS`` printed; it must succeed."""
    done = run_capacity(settings, redis_server, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def capacity_rows(evaluation):
    """The rows of an evaluation that ``capacity.py --json`` printed, by service."""
    return {row['service']: row for row in json.loads(evaluation)}


@contextmanager
def watching(settings, redis_server, output, *args):
    """``python capacity.py ARGS`` running, printing into the file ``output``, until the block ends."""
    with open(output, 'w') as stream:
        process = subprocess.Popen([sys.executable, 'capacity.py', *args], cwd=ROOT,
                                   env=process_env(settings, redis_server), stdout=stream)
        try:
            yield
        finally:
            stop(process)


def workers_needed(url):
    """The gauge gateway_workers_needed of the gateway at ``url``, by service."""
    return {dict(labels)['service']: value for (name, labels), value in scrape(url).items()
            if name == 'gateway_workers_needed'}


@pytest.fixture
def five_waiting(gateway, redis_db):
    """Five echo jobs submitted just now, with no echo worker."""
    return gateway.waiting('echo', 5)


SHORT_WAIT = {'target_wait': 60, 'start_delay': 30}


@pytest.fixture(scope='module')
def short_wait_settings(tmp_path_factory, web_server):
    """The tests' settings, but 4 workers at most in all, and echo and crash jobs to start
    within 60 s on workers that take 30 s to start (expected_duration stays 60 s)."""
    return write_settings(tmp_path_factory.mktemp('short-wait') / 'settings.ini', web_server,
                          gateway={'max_workers_total': 4}, services={'echo': SHORT_WAIT, 'crash': SHORT_WAIT})


@pytest.fixture(scope='module')
def short_wait_process(short_wait_settings, redis_server):
    """A gateway running on ``short_wait_settings``."""
    with gateway_on(short_wait_settings, redis_server) as gateway:
        yield gateway


@pytest.fixture
def short_wait_gateway(short_wait_process, redis_db):
    """A client of ``short_wait_process``, on a Redis flushed for the test."""
    return short_wait_process


@pytest.fixture
def over_the_total(short_wait_gateway):
    """7 echo and 3 crash jobs submitted just now, with no worker: needs of 5 and 2, over the total of 4."""
    short_wait_gateway.waiting('echo', 7)
    short_wait_gateway.waiting('crash', 3)


@pytest.fixture
def echo_quiet_lately(redis_db):
    """echo: one submission 10 minutes ago and none since, two finished jobs (10 s and 20 s), no queue."""
    with redis_db.pipeline() as pipe:
        record_submission(pipe, 'echo', now=time.time() - 600)
        pipe.execute()
    record_durations(redis_db, 'echo', 10, 20)


def test_loads_read_queue_workers_rate_and_durations(settings_file, start_worker, held_job, five_waiting, redis_db):
    start_worker('held')
    held_job()
    record_durations(redis_db, 'echo', *range(1, 11))
    settings = load_settings(settings_file, {})
    figures = read_figures(redis_db, settings)
    echo, held = (load_of(settings.services[name], figures[name]) for name in ('echo', 'held'))
    assert (echo.queued, echo.running, echo.workers, echo.busy) == (5, 0, 0, 0)
    assert (held.queued, held.running, held.workers, held.busy) == (0, 1, 1, 1)
    assert 5 / 360 < echo.arrival_rate <= 5 / 300  # 5 submissions within the last 5 to 6 minutes
    assert 300 <= echo.arrival_window < 360
    assert (echo.mean_duration, echo.p90_duration) == (5.5, 9.1)  # p90 within the durations seen
    assert (held.mean_duration, held.p90_duration) == (None, None)
    assert 0 <= echo.oldest_wait < 30 and held.oldest_wait is None


def test_json_gives_each_services_figures_and_need(settings_file, redis_server, five_waiting):
    echo = capacity_rows(capacity(settings_file, redis_server, '--json'))['echo']
    # D = expected_duration 60 (no history), T = 300, R = 30, u = 0.7, rate <= 5/300, window >= 300 s:
    # the 5 queued jobs take the whole rate (5/300 - 5/300 = 0): present = 0,
    # steady = rate * 60 * (1/0.7 - 1) <= 0.43; backlog = 5 / (1 + 270 / 60) = 0.91; need 1
    assert {key: echo[key] for key in ('queued', 'running', 'workers', 'busy', 'needed', 'delta')} == {
        'queued': 5, 'running': 0, 'workers': 0, 'busy': 0, 'needed': 1, 'delta': 1}
    assert echo['mean_seconds'] is None
    assert echo['notes'] == ['no duration history yet: assuming expected_duration 60 s']


def test_duration_history_replaces_expected_duration(settings_file, redis_server, redis_db, five_waiting):
    record_durations(redis_db, 'echo', 100, 140)
    echo = capacity_rows(capacity(settings_file, redis_server, '--json'))['echo']
    # D = 120, T = 300, R = 30: backlog = 5 / (1 + 270 / 120) = 1.54 -> 2 (expected_duration 60: 5 / 5.5 -> 1)
    # steady: the 5 queued take the whole rate, present = 0; rate * 120 * (1/0.7 - 1) <= 5/300 * 51.4 = 0.86
    assert (echo['mean_seconds'], echo['needed'], echo['notes']) == (120.0, 2, [])


def test_queue_needs_the_workers_that_start_it_within_target_wait(short_wait_settings, redis_server, redis_db,
                                                                  short_wait_gateway):
    record_durations(redis_db, 'echo', 10, 20)
    short_wait_gateway.waiting('echo', 8)
    echo = capacity_rows(capacity(short_wait_settings, redis_server, '--json'))['echo']
    # D = 15 (p90 19), T = 60, R = 30, no busy worker: a new worker starts 1 + (60 - 30) / 15 = 3 jobs
    # within T; backlog = 8 / 3 = 2.67 -> 3, within max_workers_total 4. Steady: the 8 queued take the
    # whole rate, present = 0; rate * 15 * (1/0.7 - 1) <= 8/300 * 6.4 = 0.17.
    # Wrong readings: R left out, 8 / (1 + 60 / 15) = 1.6 -> 2; no first job at R, 8 * 15 / 30 = 4;
    # p90, 8 / (1 + 30 / 19) = 3.1 -> 4; expected_duration 60, 8 / 1.5 = 5.33 -> 6 (4 within the total)
    assert (echo['queued'], echo['mean_seconds'], echo['needed'], echo['delta']) == (8, 15.0, 3, 3)


def test_plan_shares_max_workers_total_by_need(short_wait_settings, redis_db, over_the_total):
    settings = load_settings(short_wait_settings, {})
    loads = {name: load_of(settings.services[name], figures)
             for name, figures in read_figures(redis_db, settings).items()}
    # D = 60 (no history), T = 60, R = 30: a new worker starts 1 + 30 / 60 = 1.5 jobs within T
    # echo 7 / 1.5 = 4.67 -> 5, crash 3 / 1.5 = 2 (steady <= 7/300 * 60 * (1/0.7 - 1) = 0.6); others 0
    # 5 + 2 > 4: floors 0, shares 4 * 5/7 = 2.86 and 4 * 2/7 = 1.14 -> 2 and 1, the one left to echo (.86 > .14)
    assert plan(loads, settings.max_workers_total) == {**dict.fromkeys(settings.services, 0), 'echo': 3, 'crash': 1}


def test_metrics_publish_the_needs_shared_within_max_workers_total(short_wait_settings, short_wait_gateway,
                                                                   over_the_total):
    # as planned above: echo 5 and crash 2 share the total of 4 as 3 and 1
    services = load_settings(short_wait_settings, {}).services
    assert workers_needed(short_wait_gateway.url) == {**dict.fromkeys(services, 0), 'echo': 3, 'crash': 1}


def test_table_has_a_row_per_service(settings_file, redis_server, five_waiting):
    lines = capacity(settings_file, redis_server).splitlines()
    assert lines[0].split() == ['service', 'queued', 'running', 'workers', 'busy', 'rate/min', 'mean', 's',
                                'needed', 'delta']
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if ':' not in line}
    assert set(rows) == set(load_settings(settings_file, {}).services)
    queued, running, workers, busy, rate, mean, needed, delta = rows['echo']
    assert (queued, running, workers, busy, mean, needed, delta) == ('5', '0', '0', '0', '-', '1', '+1')
    assert 0.83 <= float(rate) <= 1  # per minute, rounded to 0.01
    assert 'echo: no duration history yet: assuming expected_duration 60 s' in lines


def test_table_shows_a_dash_for_the_rate_of_a_service_without_recent_submissions(settings_file, redis_server,
                                                                                 echo_quiet_lately):
    lines = capacity(settings_file, redis_server).splitlines()
    # service, queued, running, workers, busy, rate/min, mean s, needed, delta
    assert next(line.split() for line in lines if line.split()[0] == 'echo') == [
        'echo', '0', '0', '0', '0', '-', '15.0', '0', '+0']


def test_note_says_when_a_service_had_no_submissions_in_the_last_minutes(settings_file, redis_server,
                                                                         echo_quiet_lately):
    lines = capacity(settings_file, redis_server).splitlines()
    # the submission 10 minutes ago is outside the 5-minute window; durations are known, so that is the only note
    assert [line for line in lines if line.startswith('echo:')] == ['echo: no submissions in the last 5 minutes']


def test_heroku_scales_each_procfile_process_to_its_services_needs(settings_file, redis_server, five_waiting,
                                                                   tmp_path):
    procfile = tmp_path / 'Procfile'
    procfile.write_text('web: waitress-serve --port=$PORT app:app\nechoes: python worker.py echo crash\n'
                        'dashboard: rq-dashboard\n')
    assert capacity(settings_file, redis_server, '--heroku', '--procfile', str(procfile)).splitlines() == [
        'heroku ps:scale echoes=1'] + [f'# {service}: no Procfile process runs python worker.py {service}'
                                       for service in load_settings(settings_file, {}).services
                                       if service not in ('echo', 'crash')]


def test_exec_runs_for_each_service_whose_need_differs_from_its_workers(settings_file, redis_server,
                                                                        five_waiting, tmp_path):
    log = tmp_path / 'scaled'
    capacity(settings_file, redis_server, '--exec', f'sh -c "echo {{service}} {{workers}} {{delta}} >> {log}"')
    assert log.read_text().splitlines() == ['echo 1 1']


def test_watch_acts_once_per_change_of_need(settings_file, redis_server, five_waiting, tmp_path):
    log, tables = tmp_path / 'scaled', tmp_path / 'tables'
    with watching(settings_file, redis_server, tables, '--watch', '0.2', '--exec',
                  f'sh -c "echo {{service}} {{workers}} >> {log}"'):
        # five evaluations, the need unchanged after the first
        wait_until(lambda: tables.read_text().count('service') >= 5, message='five evaluations')
    assert log.read_text().splitlines() == ['echo 1']


def test_watch_adds_its_period_to_start_delay(settings_file, redis_server, five_waiting, tmp_path):
    evaluations = tmp_path / 'evaluations'
    with watching(settings_file, redis_server, evaluations, '--json', '--watch', '240'):
        # the first evaluation is printed at once, the next one 240 s later
        wait_until(lambda: evaluations.read_text().endswith('\n'), message='the first evaluation')
    first = capacity_rows(evaluations.read_text().splitlines()[0])
    # T = 300, D = 60 (no history), 5 queued, no worker; R = start_delay 30 + the period 240 = 270:
    # a new worker starts 1 + (300 - 270) / 60 = 1.5 jobs within T; 5 / 1.5 = 3.33 -> 4
    # (R without the period: 5 / (1 + 270 / 60) = 0.91 -> 1; with it twice, 510 >= T: 5 / 1 = 5)
    assert first['echo']['needed'] == 4


def test_metrics_publish_the_same_needs(settings_file, redis_server, gateway, five_waiting):
    rows = capacity_rows(capacity(settings_file, redis_server, '--json'))
    needed = {service: row['needed'] for service, row in rows.items()}
    assert workers_needed(gateway.url) == needed


def test_capacity_without_redis_url_says_so(settings_file, redis_server):
    done = run_capacity(settings_file, redis_server, REDIS_URL=None)
    assert done.returncode != 0 and done.stderr.strip() == 'settings error: REDIS_URL is not set'


def test_capacity_with_redis_down_says_so(settings_file, stopped_redis):
    done = run_capacity(settings_file, stopped_redis)
    assert done.returncode != 0 and done.stderr.startswith('capacity: Redis is unavailable')


def test_exec_leaves_other_braces_to_the_command(settings_file, redis_server, five_waiting, tmp_path):
    log = tmp_path / 'scaled'
    capacity(settings_file, redis_server, '--exec', f'sh -c "echo {{service}} ${{CAPACITY_TEST:-unset}} >> {log}"')
    assert log.read_text().splitlines() == ['echo unset']


def test_exec_that_cannot_run_is_reported(settings_file, redis_server, five_waiting):
    done = run_capacity(settings_file, redis_server, '--exec', 'no-such-scaler {service}')
    assert done.returncode == 0 and "capacity: no-such-scaler echo failed: [Errno 2]" in done.stderr
