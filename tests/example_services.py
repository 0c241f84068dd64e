"""Services that exist only for the tests, each named in the tests' settings (conftest.py)."""

import os
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
    raise RuntimeError('the service broke')


def custom_failure(request):
    raise ServiceError('no speech found', code=601)


def fail_once(request):
    """Fail the first attempt: the marker file named by misc["marker"] records that it happened."""
    marker = Path(request.misc['marker'])
    if not marker.exists():
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
