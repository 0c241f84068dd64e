"""`python app.py` with no REDIS_URL: everything on one machine, from the shipped settings."""

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
import requests
from fakeredis import TcpFakeServer
from rq import Worker

from conftest import ROOT, Gateway, free_port, wait_until


def children_of(pid):
    """Pids of the processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid):
    try:
        os.kill(pid, 0)
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.fixture
def embedded():
    """``python app.py`` started as a user would, with the lines it printed."""
    env = {key: value for key, value in os.environ.items()
           if key not in ('REDIS_URL', 'GATEWAY_JWT_SECRET', 'GATEWAY_SETTINGS', 'GATEWAY_EMBEDDED_REDIS')}
    env['PORT'] = str(free_port())
    process = subprocess.Popen([sys.executable, 'app.py'], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    lines = []

    def read():
        for line in process.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    wait_until(lambda: any('curl' in line for line in lines) or process.poll() is not None, timeout=60,
               message='the curl command')
    yield process, lines
    if process.poll() is None:
        process.terminate()  # stops what it started, as Ctrl-C does
        process.wait(timeout=30)


class PrintedCommand(Gateway):
    """The curl command ``python app.py`` printed, taken apart: a client of the gateway with the
    printed token, and the command's service and document."""

    def __init__(self, lines):
        command = next(line for line in lines if '/annotate' in line)
        url, self.service = re.search(r'curl (http://[^/]+)/(\w+)/annotate', command).groups()
        super().__init__(url, authorization=re.search(r'--header "Authorization: ([^"]+)"', command)[1])
        self.doc_url = re.search(r'doc_url=(\S+)', command)[1]

    def final_state(self, uuid):
        final, _ = self.wait_for(self.service, uuid, 'SUCCESS', 'FAILURE', timeout=30)
        return final


def test_embedded_default_runs_the_full_flow_to_success(embedded):
    _, lines = embedded
    assert lines[0].startswith('Embedded mode: in-memory Redis (fakeredis)')
    command = PrintedCommand(lines)
    state = command.final_state(command.submitted(command.service, doc_url=command.doc_url))
    assert state['status'] == 'SUCCESS'
    assert state['result'][0]['type'] == 'audio' and state['result'][0]['duration'] > 1
    assert {annotation['type'] for annotation in state['result'][1:]} == {'sound', 'silence'}


def test_embedded_storage_takes_annotations_and_serves_documents(embedded):
    command = PrintedCommand(embedded[1])
    state = command.final_state(command.submitted(command.service, 'annotate/hello.wav', ann_doc_id='doc 1'))
    assert state['status'] == 'SUCCESS', state
    storage = command.doc_url.rsplit('/', 1)[0]
    stored = requests.get(f'{storage}/document/doc%201/annotations', timeout=10).json()
    assert stored == {'common': {}, 'data': state['result']}


def test_ctrl_c_stops_everything_it_started(embedded):
    process, _ = embedded
    children = children_of(process.pid)
    assert len(children) >= 2  # the gateway and a worker per service
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(pid) for pid in children), timeout=15, message='the children to stop')


def test_fakeredis_still_breaks_rq_worker_start_up():
    """While this passes, worker.EmbeddedRedisWorker is needed; when it fails, delete that class."""
    server = TcpFakeServer(('127.0.0.1', 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        connection = redis.Redis(*server.server_address)
        with pytest.raises(ValueError):
            Worker(['probe'], connection=connection)
    finally:
        server.shutdown()
        server.server_close()


def test_workers_on_a_real_redis_use_rqs_own_start_up(start_worker, redis_server):
    if redis_server.is_fake:
        pytest.skip('needs a real redis-server')
    worker = start_worker('echo')
    assert worker.ip_address not in ('', 'unknown')
