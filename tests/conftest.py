"""Shared fixtures: every part is real and talks over loopback.

- ``redis_server``: a private ``redis-server`` on a free port, stopped and started by fault
  tests. Where none is installed (and not in CI) fakeredis's TCP server stands in, with a notice.
- ``web``: the outside world of the gateway: documents to download, an annotation store
  (which can be taken down) and a callback receiver.
- ``gateway``: ``waitress-serve app:app`` as a subprocess, with a client that carries a token.
- ``start_worker``: ``python worker.py SERVICE...`` subprocesses, stopped after the test.
- ``held_job``: jobs that run until the test ends.

Redis is flushed before each test; it is this session's own server, never a shared one.
"""

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from rq import Worker

from records import record_duration

ROOT = Path(__file__).resolve().parent.parent
SECRET = 'a-test-secret-of-sixty-four-bytes-' + 'x' * 30  # long enough for HS512
AUDIENCE = 'service-gateway-tests'


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_until(condition, timeout=10.0, interval=0.05, message='condition'):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout} s waiting for '
                                 f'{message() if callable(message) else message}')
        time.sleep(interval)


# Redis -------------------------------------------------------------------------------------

class RedisServer:
    """A private Redis on a free port that a test can stop and start again (same port)."""

    def __init__(self, directory):
        self.port = free_port()
        self.directory = directory
        self.binary = shutil.which('redis-server')
        self.process = None
        self.url = f'redis://127.0.0.1:{self.port}/0'

    @property
    def is_fake(self):
        return self.binary is None

    def start(self):
        if self.is_fake:
            command = [sys.executable, '-c', 'import sys; from fakeredis import TcpFakeServer; '
                       'TcpFakeServer(("127.0.0.1", int(sys.argv[1]))).serve_forever()', str(self.port)]
        else:
            command = [self.binary, '--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
                       '--appendonly', 'no', '--dir', str(self.directory)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = self.client()
        wait_until(lambda: self._answers(client), message=f'Redis on port {self.port}')

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)

    def pause(self):
        """Freeze the server: it accepts connections but answers nothing."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    def client(self):
        return redis.Redis.from_url(self.url)

    @staticmethod
    def _answers(client):
        try:
            return client.ping()
        except redis.ConnectionError:
            return False


@pytest.fixture(scope='session')
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp('redis'))
    if server.is_fake and os.environ.get('CI'):
        pytest.exit('CI needs a real redis-server on PATH (.ci/run installs it)', returncode=3)
    server.start()
    yield server
    server.resume()
    server.stop()


FAKE_REDIS_NOTICE = ('NOTICE: redis-server not found, so these tests ran on fakeredis\'s TCP server; '
                     'install redis-server to test against a real Redis (CI does)')


def pytest_report_header(config):
    binary = shutil.which('redis-server')
    if binary:
        return f'redis: {subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()}'
    return FAKE_REDIS_NOTICE


def pytest_terminal_summary(terminalreporter):
    if not shutil.which('redis-server'):
        terminalreporter.write_sep('=', FAKE_REDIS_NOTICE, yellow=True)


@pytest.fixture
def redis_db(redis_server):
    """A client of the private Redis, flushed so that each test starts from nothing.

    fakeredis is restarted instead: it keeps serving the blocking dequeue of a worker
    that has gone, which would take the next test's job.
    """
    if redis_server.is_fake and redis_server.process.poll() is None:
        redis_server.stop()
    if redis_server.process.poll() is not None:  # stopped above, or left stopped by a fault test
        redis_server.start()
    client = redis_server.client()
    client.flushall()
    return client


def record_durations(redis_db, service, *seconds):
    """Record finished jobs of ``service`` that took ``seconds``, as workers do."""
    with redis_db.pipeline() as pipe:
        for duration in seconds:
            record_duration(pipe, service, duration)
        pipe.execute()


@pytest.fixture
def stopped_redis(redis_server, redis_db):
    """Redis stopped for the test, started again after it."""
    redis_server.stop()
    yield redis_server
    redis_server.start()


@pytest.fixture
def hung_redis(redis_server, redis_db):
    """Redis frozen for the test (it accepts connections, answers nothing), thawed after it."""
    redis_server.pause()
    yield redis_server
    redis_server.resume()


# The outside world on loopback ---------------------------------------------------------------

class Web:
    """Documents, an annotation store and a callback receiver, each recording what it got."""

    def __init__(self):
        self.documents = {}   # name: bytes served at /docs/<name>
        self.held = {}        # name: threading.Event; the document is served once it is set
        self.trickled = set()  # names of documents sent one byte every 0.05 s
        self.stored = []      # (ann_doc_id, body) posted to the store
        self.callbacks = []   # bodies posted to /callback
        self.store_status = 200
        self.store_stalls = 0  # how many of the next posts to the store get no answer (until reset)
        self.unstalled = threading.Event()
        self.server = self._serve(('127.0.0.1', 0), self._documents_and_callbacks)
        self.store_port = free_port()
        self.store = None
        self.start_store()

    def url(self, path):
        return 'http://127.0.0.1:{}{}'.format(self.server.server_address[1], path)

    @property
    def store_url(self):
        return f'http://127.0.0.1:{self.store_port}'

    def start_store(self):
        self.store = self._serve(('127.0.0.1', self.store_port), self._annotation_store)

    def stop_store(self):
        self.store.shutdown()
        self.store.server_close()

    def store_is_up(self):
        return _listening(self.store_port)

    def reset(self):
        for event in self.held.values():
            event.set()
        self.held.clear()
        self.trickled.clear()
        self.documents.clear()
        self.stored.clear()
        self.callbacks.clear()
        self.store_status = 200
        self.store_stalls = 0
        self.unstalled.set()
        self.unstalled = threading.Event()

    def wait_for_callbacks(self, count, timeout=15):
        return wait_until(lambda: len(self.callbacks) >= count and self.callbacks, timeout,
                          message=f'{count} callback(s)')

    def _documents_and_callbacks(self, handler):
        if handler.command == 'GET' and handler.path.startswith('/docs/'):
            name = handler.path[len('/docs/'):]
            if name in self.held:
                self.held[name].wait(timeout=30)
            body = self.documents.get(name)
            if body is not None and name in self.trickled:
                return 200, (body[i:i + 1] for i in range(len(body)))
            return (200, body) if body is not None else (404, b'no such document')
        if handler.command == 'POST' and handler.path == '/callback':
            self.callbacks.append(json.loads(handler.body))
            return 200, b'{}'
        return 404, b'not found'

    def _annotation_store(self, handler):
        # post_annotations_url of the tests: /document/{ann_doc_id}/annotations?storageType=2
        parts = handler.path.split('?')[0].split('/')
        if handler.command != 'POST' or len(parts) != 4 or parts[1] != 'document':
            return 404, b'not found'
        self.stored.append((parts[2], json.loads(handler.body)))
        if self.store_stalls:
            self.store_stalls -= 1
            self.unstalled.wait(timeout=30)
        return self.store_status, b'{}'

    @staticmethod
    def _serve(address, route):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.answer()

            def answer(self):
                self.body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
                status, body = route(self)
                self.send_response(status)
                if isinstance(body, bytes):
                    self.send_header('Content-Length', str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.end_headers()  # a trickle: one piece every 0.05 s, until the client gives up
                for piece in body:
                    try:
                        self.wfile.write(piece)
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.05)

            def log_message(self, *args):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        server = ThreadingHTTPServer(address, Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


@pytest.fixture(scope='session')
def web_server():
    return Web()


@pytest.fixture
def web(web_server):
    web_server.reset()
    if not web_server.store_is_up():
        web_server.start_store()
    return web_server


def wav_bytes(segments, rate=8000):
    """A 16-bit mono PCM WAV: ``segments`` is a list of (seconds, amplitude 0..1) of a 440 Hz tone."""
    frames = bytearray()
    for seconds, amplitude in segments:
        for n in range(int(seconds * rate)):
            frames += int(amplitude * 32767 * math.sin(2 * math.pi * 440 * n / rate)).to_bytes(2, 'little', signed=True)
    buffer = io.BytesIO()
    with wave.open(buffer, 'wb') as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(frames))
    return buffer.getvalue()


# Settings of the tests -----------------------------------------------------------------------

# The CANARIE fields every [gateway] section must have.
PLATFORM = """name = Service Gateway under test
synopsis = The gateway of the tests
version = 9.9.9
institution = Test institute
releaseTime = 2026-01-02T03:04:05Z
researchSubject = Testing
supportEmail = tests@example.org
category = Testing
tags = one, two words
"""

# The rest of the tests' [gateway].
GATEWAY = {'result_ttl': 600, 'uuid_ttl': 1200, 'max_content_length': 4096, 'worker_ttl': 20,
           'doc': 'https://example.org/gateway-doc', 'support': 'Write to tests@example.org,200',
           'tryme': 'Not here,404', 'releasenotes': 'Nothing new,200', 'licence': 'echo-doc.md',
           'provenance': 'https://example.org/provenance'}

# The tests' services: name: (function of tests/example_services.py, keys besides version and function).
TEST_SERVICES = {
    'annotator': ('paced_annotate', {}),
    'echo': ('echo', {'name': 'Echo', 'synopsis': 'Returns what it received', 'doc': 'echo-doc.md',
                      'releasenotes': 'echo-notes.html'}),
    'crash': ('crash', {}),
    'die': ('die', {'retries': 1, 'retry_interval': 2}),
    'held': ('wait_for_release', {}),
    'slowdoc': ('document_size', {'download_timeout': 1}),
    'downloader': ('download_then_sleep', {}),
    'stepper': ('progress_in_steps', {}),
    'eager': ('report_then_download', {}),
    'typed': ('own_number_type', {}),
    'custom': ('custom_failure', {}),
    'flaky': ('fail_once', {'retries': 1, 'retry_interval': 2}),
    'sleeper': ('sleep_until_cancelled', {}),
    'overtime': ('sleep_until_cancelled', {'timeout': 1}),
    'small': ('document_size', {'max_document_size': 1000}),
    'quiet': ('echo', {'noparams': 'true'}),
}


# A page file that is a whole HTML document, served as it is.
ECHO_NOTES = '<!DOCTYPE html>\n<html lang="en"><head><title>Echo notes</title></head><body><p>1.0.0</p></body></html>\n'


def ini_lines(keys):
    """``key = value`` lines, leaving out the keys set to None."""
    return ''.join(f'{key} = {value}\n' for key, value in keys.items() if value is not None)


def write_settings(path, web, gateway=None, services=None, storage=True):
    """The tests' settings: services of tests/example_services.py, storage on the ``web`` fixture.
    ``gateway`` keys override those of [gateway] and ``services`` (name: keys) those of a service;
    a key set to None is left out."""
    services = services or {}
    assert set(services) <= set(TEST_SERVICES), f'no such test service: {set(services) - set(TEST_SERVICES)}'
    storage_urls = f"""
get_storage_doc_url = {web.url('/docs/{storage_doc_id}')}
post_annotations_url = {web.store_url}/document/{{ann_doc_id}}/annotations?storageType=2""" if storage else ''
    path.with_name('echo-doc.md').write_text('# Echo\n\nReturns what it **received**.\n')
    path.with_name('echo-notes.html').write_text(ECHO_NOTES)
    service_sections = ''.join(
        f'[service:{name}]\n' + ini_lines({'version': '1.0.0', 'function': f'tests.example_services.{function}',
                                       **keys, **services.get(name, {})})
        for name, (function, keys) in TEST_SERVICES.items())
    path.write_text(f"""
[gateway]
{PLATFORM}{ini_lines({**GATEWAY, **(gateway or {})})}[security]
jwt_audience = {AUDIENCE}
jwt_algorithm = HS256
[storage]{storage_urls}
timeout = 2
retries = 2
callback_retries = 1
{service_sections}""")
    return path


@pytest.fixture(scope='session')
def settings_file(tmp_path_factory, web_server):
    return write_settings(tmp_path_factory.mktemp('settings') / 'settings.ini', web_server)


def process_env(settings_file, redis_server, **extra):
    """The environment of a process of the gateway, with ``extra`` variables (None: left out)."""
    env = dict(os.environ, GATEWAY_SETTINGS=str(settings_file), REDIS_URL=redis_server.url,
               GATEWAY_JWT_SECRET=SECRET, PYTHONPATH=str(ROOT))
    if redis_server.is_fake:
        env['GATEWAY_EMBEDDED_REDIS'] = '1'
    env.update(extra)
    return {name: value for name, value in env.items() if value is not None}


# The gateway and its workers -----------------------------------------------------------------

def token(secret=SECRET, algorithm='HS256', audience=AUDIENCE, expires_in=300, **claims):
    now = int(time.time())
    return jwt.encode({'aud': audience, 'iat': now, 'exp': now + expires_in, **claims}, secret, algorithm=algorithm)


NOWHERE = 'http://127.0.0.1:9/a.wav'  # nothing serves it (port 9): for jobs that never download theirs


class Gateway:
    """A client of the gateway under test; ``submit`` carries a valid token unless told otherwise."""

    def __init__(self, url, authorization=None):
        self.url = url
        self.authorization = authorization  # sent with submissions; None: a fresh token of the tests' secret

    def submit(self, service, route='annotate', headers=None, **kwargs):
        headers = {'Authorization': self.authorization or f'Bearer {token()}', **(headers or {})}
        return requests.post(f'{self.url}/{service}/{route}', headers=headers, timeout=10, **kwargs)

    def submitted(self, service, route='annotate', **fields):
        """Submit form fields and return the new uuid (the submission must be accepted)."""
        answer = self.submit(service, route, data=fields)
        assert answer.status_code == 202, answer.text
        return answer.json()['uuid']

    def waiting(self, service, count):
        """``count`` jobs of ``service`` submitted just now, waiting where no worker runs them."""
        return [self.submitted(service, doc_url=NOWHERE) for _ in range(count)]

    def running(self, service, status='PROGRESS', **fields):
        """Submit a job (of NOWHERE unless ``fields`` say) and wait until its service runs it."""
        uuid = self.submitted(service, **{'doc_url': NOWHERE, **fields})
        self.wait_for(service, uuid, status)
        return uuid

    def status(self, service, uuid, **kwargs):
        return requests.get(f'{self.url}/{service}/status', params={'uuid': uuid}, timeout=10, **kwargs)

    def state(self, service, uuid):
        answer = self.status(service, uuid)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def cancel(self, service, uuid):
        return requests.post(f'{self.url}/{service}/cancel', params={'uuid': uuid},
                             headers={'Authorization': token()}, timeout=10)

    def wait_for(self, service, uuid, *statuses, timeout=20):
        """Poll the status until it is one of ``statuses``; return it with every status seen on the way."""
        seen = []

        def reached():
            state = self.state(service, uuid)
            seen.append(state)
            return state if state['status'] in statuses else None

        final = wait_until(reached, timeout, message=lambda: f'{uuid} to reach {statuses} (last seen: '
                                                             f'{[s["status"] for s in seen][-5:]})')
        return final, seen


def scrape(url):
    """The samples of the gateway's /metrics at ``url``, by (name, sorted labels)."""
    answer = requests.get(f'{url}/metrics', timeout=10)
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('text/plain')
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}


@contextmanager
def gateway_on(settings, redis_server, *options):
    """``waitress-serve [options] app:app`` on a free port, as the Procfile runs it: a client of it,
    stopped on leaving."""
    port = free_port()
    process = subprocess.Popen([sys.executable, '-m', 'waitress', f'--port={port}', '--host=127.0.0.1',
                                *options, 'app:app'], cwd=ROOT, env=process_env(settings, redis_server))
    try:
        wait_until(lambda: _listening(port) or process.poll() is not None, message='the gateway')
        assert process.poll() is None, 'the gateway did not start'
        yield Gateway(f'http://127.0.0.1:{port}')
    finally:
        stop(process)


def stop(process):
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope='session')
def gateway_process(settings_file, redis_server):
    """The session's gateway, one process for all the tests."""
    with gateway_on(settings_file, redis_server) as gateway:
        yield gateway


@pytest.fixture
def gateway(gateway_process, redis_db):
    """A client of the session's gateway, on a Redis flushed for the test."""
    return gateway_process


@pytest.fixture
def start_worker(settings_file, redis_server, redis_db):
    """Start ``python worker.py SERVICE...``; it is ready when registered with RQ. Stopped after the test."""
    processes = []

    def start(*services, settings=settings_file):
        before = {worker.name for worker in Worker.all(connection=redis_db)}
        process = subprocess.Popen([sys.executable, 'worker.py', *services], cwd=ROOT, start_new_session=True,
                                   env=process_env(settings, redis_server, LOG_LEVEL='WARNING'))
        processes.append(process)
        new = wait_until(lambda: [worker for worker in Worker.all(connection=redis_db) if worker.name not in before]
                         or process.poll() is not None, message=f'a worker for {services}')
        assert process.poll() is None, f'worker for {services} exited with {process.returncode}'
        return new[0]

    yield start
    for process in processes:
        stop_worker(process)


@pytest.fixture
def held_job(gateway, start_worker, tmp_path):
    """Submit a job of the service ``held``, which runs until released, and wait until it has
    started unless told not to. All are released after the test, failed or not, before its
    workers are stopped (which would otherwise have to kill them)."""
    release = tmp_path / 'release'

    def submit(started=True):
        if started:
            return gateway.running('held', 'STARTED', release=str(release))
        return gateway.submitted('held', doc_url=NOWHERE, release=str(release))

    yield submit
    release.touch()


def stop_worker(process):
    """SIGTERM: an idle worker stops; a busy one finishes its job, unless a second SIGTERM,
    more than a second later (RQ ignores quicker repeats), tells it to kill the job."""
    process.terminate()
    try:
        process.wait(timeout=1.5)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=10)
    try:  # RQ's scheduler process, orphaned when a test killed its worker outright
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_idle(redis_db, worker):
    """Wait until a worker has finished its job, callback included."""
    wait_until(lambda: Worker.find_by_key(worker.key, connection=redis_db).get_state() == 'idle',
               message=f'worker {worker.name} to be idle')
