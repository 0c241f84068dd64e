"""Settings: a missing or malformed key stops start-up with one line naming section and key."""

import os
import subprocess
import sys

import jwt
import pytest

from conftest import PLATFORM, ROOT
from settings import SettingsError, load_settings


def settings_text(gateway='', service='', sections=''):
    """A settings file with the required CANARIE fields, one service, and what a test adds."""
    return (f'[gateway]\n{PLATFORM}{gateway}\n{sections}\n'
            f'[service:annotator]\nfunction = services.annotator.annotate\nversion = 1.0.0\n{service}')


MINIMAL = settings_text()


def settings_from(tmp_path, text, **environ):
    path = tmp_path / 'settings.ini'
    path.write_text(text)
    return load_settings(path, environ)


def test_shipped_settings_load():
    settings = load_settings(ROOT / 'settings.ini', {})
    assert list(settings.services) == ['annotator'] and settings.redis_url is None


def test_minimal_settings_take_the_defaults(tmp_path):
    settings = settings_from(tmp_path, MINIMAL)
    service = settings.services['annotator']
    assert (service.queue, service.timeout, service.retries, settings.jwt_algorithm) == ('annotator', 3600, 0, 'HS256')


def test_environment_overrides_redis_url_and_port(tmp_path):
    settings = settings_from(tmp_path, settings_text(gateway='redis_url = redis://a:1\nport = 1\n'),
                             REDIS_URL='redis://b:2', PORT='8080')
    assert (settings.redis_url, settings.port) == ('redis://b:2', 8080)


@pytest.mark.parametrize('text, message', [
    (f'[gateway]\n{PLATFORM}[service:annotator]\nversion = 1\n', r'\[service:annotator\] function: is required'),
    (settings_text(service='timeout = soon'), r"\[service:annotator\] timeout: 'soon' is not an integer"),
    (settings_text(service='noparams = perhaps'), r"\[service:annotator\] noparams: 'perhaps' is not a boolean"),
    (settings_text(service='tiemout = 3'), r'\[service:annotator\] tiemout: unknown key'),
    (settings_text(sections='[security]\njwt_algorithm = none'), r"\[security\] jwt_algorithm: 'NONE' is not one of"),
    (settings_text(sections='[storage]\npost_annotations_url = http://x/'),
     r'\[storage\] post_annotations_url: must contain \{ann_doc_id\}'),
    (settings_text(gateway='result_ttl = 100\nuuid_ttl = 50'), r'\[gateway\] uuid_ttl: must be longer'),
    (settings_text(gateway='max_workers_total = 1', service='min_workers = 2'),
     r"\[gateway\] max_workers_total: is less than the services' min_workers added up \(2\)"),
    (settings_text().replace('releaseTime = 2026-01-02T03:04:05Z', 'releaseTime = 2026-1-2T3:4:5Z'),
     r"\[gateway\] releaseTime: '2026-1-2T3:4:5Z' is not YYYY-MM-DDThh:mm:ssZ"),
    (settings_text(service='releaseTime = yesterday'), r"\[service:annotator\] releaseTime: 'yesterday' is not"),
    (settings_text().replace('releaseTime = 2026-01-02T03:04:05Z', 'releaseTime = 2026-13-32T25:00:00Z'),
     r"\[gateway\] releaseTime: '2026-13-32T25:00:00Z' is not"),
    (settings_text(service='tryme = Wait,100'), r"\[service:annotator\] tryme: 'Wait,100': the status .* 200-599"),
    (settings_text(service='tryme = Gone,204'), r"\[service:annotator\] tryme: 'Gone,204': the status"),
    (settings_text().replace('supportEmail = tests@example.org\n', ''), r'\[gateway\] supportEmail: is required'),
    (settings_text(sections='[services:x]'), r'\[services:x\]: unknown section'),
    (f'[gateway]\n{PLATFORM}', r'no \[service:NAME\] section'),
    ('[gateway\n', r'settings.ini: '),
])
def test_malformed_setting_is_named(tmp_path, text, message):
    with pytest.raises(SettingsError, match=message):
        settings_from(tmp_path, text)


def test_short_jwt_secret_is_refused(tmp_path):
    with pytest.raises(SettingsError, match='GATEWAY_JWT_SECRET: HS256 needs a secret of at least 32 bytes'):
        settings_from(tmp_path, MINIMAL, GATEWAY_JWT_SECRET='short')


def run(tmp_path, command, text=MINIMAL, **environ):
    (tmp_path / 'settings.ini').write_text(text)
    env = {key: value for key, value in os.environ.items() if key not in ('GATEWAY_JWT_SECRET', 'REDIS_URL')}
    env.update(GATEWAY_SETTINGS=str(tmp_path / 'settings.ini'), PYTHONPATH=str(ROOT), **environ)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)


def test_gateway_with_a_bad_setting_stops_with_one_line(tmp_path):
    done = run(tmp_path, [sys.executable, '-m', 'waitress', '--port=0', 'app:app'],
               settings_text(service='retries = -1'), GATEWAY_JWT_SECRET='s' * 32, REDIS_URL='redis://127.0.0.1:9')
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == 'settings error: [service:annotator] retries: must be at least 0'


def test_gateway_without_a_jwt_secret_does_not_start(tmp_path):
    done = run(tmp_path, [sys.executable, '-m', 'waitress', '--port=0', 'app:app'])
    assert done.returncode != 0 and 'GATEWAY_JWT_SECRET is not set' in done.stderr.strip().splitlines()[-1]


def test_gateway_without_redis_url_does_not_start(tmp_path):
    done = run(tmp_path, [sys.executable, '-m', 'waitress', '--port=0', 'app:app'], GATEWAY_JWT_SECRET='s' * 32)
    assert done.returncode != 0 and 'REDIS_URL is not set' in done.stderr.strip().splitlines()[-1]


def test_worker_without_redis_url_does_not_start(tmp_path):
    done = run(tmp_path, [sys.executable, 'worker.py', 'annotator'])
    assert done.returncode != 0 and done.stderr.strip() == 'settings error: REDIS_URL is not set'


def test_worker_for_an_unknown_service_stops_with_one_line(tmp_path):
    done = run(tmp_path, [sys.executable, 'worker.py', 'nosuch'], REDIS_URL='redis://127.0.0.1:9')
    assert done.returncode != 0
    assert done.stderr.strip() == "settings error: unknown service 'nosuch' (configured: annotator)"


def test_worker_whose_function_cannot_be_imported_stops_with_one_line(tmp_path):
    done = run(tmp_path, [sys.executable, 'worker.py', 'annotator'], MINIMAL.replace('annotator.annotate', 'nope.f'),
               REDIS_URL='redis://127.0.0.1:9')
    assert done.returncode != 0
    assert done.stderr.strip().startswith(
        "settings error: [service:annotator] function: cannot import 'services.nope.f'")


def test_token_command_prints_a_token_the_gateway_accepts(tmp_path):
    secret = 'k' * 32
    done = run(tmp_path, [sys.executable, 'app.py', 'token', '--ttl', '120'], GATEWAY_JWT_SECRET=secret)
    claims = jwt.decode(done.stdout.strip(), secret, algorithms=['HS256'], audience='service-gateway')
    assert claims['exp'] - claims['iat'] == 120


def test_token_command_without_a_secret_says_so(tmp_path):
    done = run(tmp_path, [sys.executable, 'app.py', 'token'])
    assert done.returncode != 0 and done.stderr.strip() == 'settings error: GATEWAY_JWT_SECRET is not set'
