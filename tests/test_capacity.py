"""capacity.py against a real Redis whose queues, workers and records hold known figures."""

import json
import subprocess
import sys

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from capacity import ServiceLoad, load_of, notes, read_figures
from conftest import ROOT, process_env, wait_until
from records import record_duration
from settings import load_settings


def capacity(settings_file, redis_server, *args, timeout=30):
    done = subprocess.run([sys.executable, 'capacity.py', *args], cwd=ROOT, capture_output=True, text=True,
                          env=process_env(settings_file, redis_server), timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def record_durations(redis_db, service, *seconds):
    with redis_db.pipeline() as pipe:
        for duration in seconds:
            record_duration(pipe, service, duration)
        pipe.execute()


@pytest.fixture
def five_waiting(gateway, redis_db):
    """Five echo jobs submitted just now, with no echo worker."""
    return [gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav') for _ in range(5)]


def test_loads_read_queue_workers_rate_and_durations(settings_file, gateway, start_worker, five_waiting,
                                                     redis_db, tmp_path):
    start_worker('held')
    gateway.wait_for('held', gateway.submitted('held', doc_url='http://127.0.0.1:9/a.wav',
                                               release=str(tmp_path / 'go')), 'STARTED')
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
    (tmp_path / 'go').touch()


def test_json_gives_each_services_figures_and_need(settings_file, redis_server, five_waiting):
    echo = next(row for row in json.loads(capacity(settings_file, redis_server, '--json')) if row['service'] == 'echo')
    # D = expected_duration 60 (no history), T = 300, R = 30, u = 0.7, rate <= 5/300, window >= 300 s:
    # the 5 queued jobs take the whole rate (5/300 - 5/300 = 0): present = 0,
    # steady = rate * 60 * (1/0.7 - 1) <= 0.43; backlog = 5 / (1 + 270 / 60) = 0.91; need 1
    assert {key: echo[key] for key in ('queued', 'running', 'workers', 'busy', 'needed', 'delta')} == {
        'queued': 5, 'running': 0, 'workers': 0, 'busy': 0, 'needed': 1, 'delta': 1}
    assert echo['mean_seconds'] is None
    assert echo['notes'] == ['no duration history yet: assuming expected_duration 60 s']


def test_duration_history_replaces_expected_duration(settings_file, redis_server, redis_db, five_waiting):
    record_durations(redis_db, 'echo', 10, 20)
    echo = next(row for row in json.loads(capacity(settings_file, redis_server, '--json')) if row['service'] == 'echo')
    # D = 15: steady = rate * 15 / 0.7 < 0.36; backlog = 5 / (1 + 270 / 15) = 0.26; need 1
    assert (echo['mean_seconds'], echo['needed'], echo['notes']) == (15.0, 1, [])


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
    with open(tables, 'w') as output:
        process = subprocess.Popen([sys.executable, 'capacity.py', '--watch', '0.2', '--exec',
                                    f'sh -c "echo {{service}} {{workers}} >> {log}"'], cwd=ROOT,
                                   env=process_env(settings_file, redis_server), stdout=output)
        try:  # five evaluations, the need unchanged after the first
            wait_until(lambda: tables.read_text().count('service') >= 5, message='five evaluations')
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert log.read_text().splitlines() == ['echo 1']


def test_metrics_publish_the_same_needs(settings_file, redis_server, gateway, five_waiting):
    needed = {row['service']: row['needed'] for row in json.loads(capacity(settings_file, redis_server, '--json'))}
    text = requests.get(f'{gateway.url}/metrics', timeout=10).text
    scraped = {sample.labels['service']: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == 'gateway_workers_needed'}
    assert scraped == needed


def test_capacity_without_redis_url_says_so(settings_file, redis_server):
    env = process_env(settings_file, redis_server)
    del env['REDIS_URL']
    done = subprocess.run([sys.executable, 'capacity.py'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr.strip() == 'settings error: REDIS_URL is not set'


def test_capacity_with_redis_down_says_so(settings_file, stopped_redis):
    done = subprocess.run([sys.executable, 'capacity.py'], cwd=ROOT, capture_output=True, text=True,
                          env=process_env(settings_file, stopped_redis))
    assert done.returncode != 0 and done.stderr.startswith('capacity: Redis is unavailable')


def test_exec_leaves_other_braces_to_the_command(settings_file, redis_server, five_waiting, tmp_path):
    log = tmp_path / 'scaled'
    capacity(settings_file, redis_server, '--exec', f'sh -c "echo {{service}} ${{CAPACITY_TEST:-unset}} >> {log}"')
    assert log.read_text().splitlines() == ['echo unset']


def test_exec_that_cannot_run_is_reported(settings_file, redis_server, five_waiting):
    done = subprocess.run([sys.executable, 'capacity.py', '--exec', 'no-such-scaler {service}'], cwd=ROOT,
                          capture_output=True, text=True, env=process_env(settings_file, redis_server))
    assert done.returncode == 0 and "capacity: no-such-scaler echo failed: [Errno 2]" in done.stderr


def idle_load(**given):
    values = dict(name='svc', queued=0, running=0, workers=1, busy=0, arrival_rate=None, mean_duration=60.0,
                  p90_duration=None, min_workers=0, max_workers=10, target_wait=60, expected_duration=60)
    return ServiceLoad(**{**values, **given})


def test_note_401_when_the_minimum_holds_more_workers_than_needed():
    assert any(note.startswith('code 401') for note in notes(idle_load(min_workers=1), 1))


def test_no_note_401_when_the_need_is_the_minimum_anyway():
    assert not any(note.startswith('code 401') for note in notes(idle_load(workers=3), 0))


def test_note_400_when_max_workers_holds_the_need_back():
    load = idle_load(queued=100, max_workers=2)
    assert any(note.startswith('code 400') for note in notes(load, 2))
