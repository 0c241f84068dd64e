"""Services that exist only for the tests, each named in the tests' settings (conftest.py)."""

import builtins
import os
import signal
import time
from pathlib import Path

from services.annotator import annotate
from worker import ServiceError


def paced_annotate(request):
    """The bundled annotator, waiting 0.3 s after each progress report so that tests see PROGRESS."""
    report = request.set_progress

    def paced(current):
        report(current)
        time.sleep(0.3)

    request.set_progress = paced
    return annotate(request)


def echo(request):
    """Return what the service received: its document URL and misc."""
    return [{'@id': request.uuid, '@version': request.version, 'url': request.url, 'misc': request.misc}]


def crash(request):
    """Raise the built-in exception named by misc["error"] (default RuntimeError)."""
    raise getattr(builtins, request.misc.get('error', 'RuntimeError'))('the service broke')


def die(request):
    """Kill the process running the service, as the kernel's out-of-memory killer would."""
    os.kill(os.getpid(), signal.SIGKILL)


def wait_for_release(request):
    """Run without reporting progress until the file misc["release"] exists (a minute at most)."""
    release = Path(request.misc['release'])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return [{'@id': request.uuid, 'released': release.exists()}]


def download_then_sleep(request):
    """Download the document, report progress, then run until cancelled (a minute at most)."""
    assert request.document  # downloads it
    return sleep_until_cancelled(request)


def progress_in_steps(request):
    """Download the document, report 10 %, then 20 % once the file misc["release"] exists,
    then run until cancelled (a minute at most)."""
    assert request.document  # downloads it
    request.set_progress(10)
    release = Path(request.misc['release'])
    deadline = time.monotonic() + 60
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    request.set_progress(20)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return []


def report_then_download(request):
    """Report progress, then download the document: the job stays in PROGRESS meanwhile."""
    request.set_progress(5)
    return document_size(request)


def own_number_type(request):
    """Return a float of a class of its own, which no other process could import."""
    class Level(float):
        pass

    return [{'@id': request.uuid, 'level': Level(0.5)}]


def custom_failure(request):
    raise ServiceError('no speech found', code=601)


def fail_once(request):
    """Fail the first attempt, half-way through: the marker file named by misc["marker"]
    records that it happened."""
    marker = Path(request.misc['marker'])
    if not marker.exists():
        request.set_progress(50)
        marker.write_text('failed once')
        raise ConnectionError('the first attempt fails')
    return [{'@id': request.uuid, 'attempt': 2}]


def sleep_until_cancelled(request):
    """Report progress, then run until cancelled (or for a minute at most)."""
    request.set_progress(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return []


def document_size(request):
    """Return the downloaded document's size and local path (which is gone once the job ends)."""
    return [{'size': os.path.getsize(request.document), 'path': request.document}]
