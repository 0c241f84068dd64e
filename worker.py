"""Workers of the Service Gateway, and everything a service author touches.

``python worker.py SERVICE [SERVICE...]`` runs one RQ worker on those services'
queues. Start as many as the load needs, on as many machines as you like: they
only need the same ``settings.ini`` and ``REDIS_URL`` as the gateway.

A service is a function named by its ``function`` setting. It receives a
``Request`` and returns its annotations, a JSON list::

    def annotate(request):
        with open(request.document, 'rb') as document:   # downloaded on first use
            ...
            request.set_progress(50)
        return [{'@id': ..., '@version': request.version, ...}]

To fail with a code of its own (from 600 up), a service raises
``ServiceError(message, code=6xx)``; any other exception becomes the code of
its kind (SPEC section 6). The worker then posts the annotations to the
annotation store, if the client named a document there, and tells the
client's ``callback_url`` how the job ended.
"""

import argparse
import functools
import importlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from rq import Queue, Worker, get_current_job
from rq.job import JobStatus
from rq.timeouts import JobTimeoutException
from urllib3.util.retry import Retry as HTTPRetry

from records import record_duration, uuid_key
from settings import SettingsError, exit_on_settings_error, load_settings, require_redis_url, worker_redis

log = logging.getLogger('worker')


@functools.cache
def current_settings():
    return load_settings()


@functools.cache
def service_function(dotted_path):
    module, _, name = dotted_path.rpartition('.')
    return getattr(importlib.import_module(module), name)


# Errors ------------------------------------------------------------------------------------

class ServiceError(Exception):
    """A job failure with its code (SPEC section 6), shown in the FAILURE result.

    Raise it from a service with ``code=600`` or above for errors of the service's own;
    lower codes are the gateway's, raised by the subclasses that follow.
    """

    code = 306

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            if not isinstance(code, int) or isinstance(code, bool) or code < 600:
                raise ValueError(f"a service's own error codes start at 600, not {code!r}")
            self.code = code


class AnnotationFormatError(ServiceError):
    """The service returned something that is not a JSON list."""

    code = 300


class DownloadError(ServiceError):
    """The document could not be downloaded within the service's limits."""

    code = 301


class StorageError(ServiceError):
    """The annotation store did not accept the annotations."""

    code = 302


class UnsupportedDocument(ServiceError):
    """The document is not of a type the service can read."""

    code = 305


# The seed's codes for the Python errors a service most often lets escape.
EXCEPTION_CODES = ((KeyError, 108), (TypeError, 104), (ValueError, 105), (OSError, 107))


def failure_of(error, service):
    """The ``{"code", "message"}`` a client sees for an exception raised by a job."""
    if isinstance(error, ServiceError):
        return {'code': error.code, 'message': str(error)}
    if isinstance(error, JobTimeoutException):
        return {'code': 306, 'message': f'the service did not finish within its timeout of {service.timeout} s'}
    code = next((code for kind, code in EXCEPTION_CODES if isinstance(error, kind)), 306)
    return {'code': code, 'message': f'{type(error).__name__}: {error}'}


# The request a service receives ------------------------------------------------------------

class Request:
    """What a service function receives: the client's document and parameters, and a
    way to report progress. The document is downloaded on first use of ``document``."""

    def __init__(self, job, message, service):
        self.uuid = job.id
        self.service = service.name
        self.version = service.version
        self.url = message['service']['document']['url']
        self.misc = message['service']['misc']
        self.logger = logging.LoggerAdapter(log.getChild(service.name), {'uuid': job.id})
        self._job = job
        self._max_document_size = service.max_document_size
        self._download_timeout = service.download_timeout
        self._document = None

    @property
    def document(self):
        """Local path of the downloaded document (downloaded on first use)."""
        if self._document is None:
            if not self.url:
                raise DownloadError('this request has no document URL')
            # SPEC: RECEIVED while the document downloads, unless the service reported progress.
            if self._job.meta.get('phase') == 'started':
                save_meta(self._job, phase='received')
            directory = job_directory(self.uuid)
            shutil.rmtree(directory, ignore_errors=True)  # left by an attempt whose worker died
            try:
                os.mkdir(directory, 0o700)
            except OSError as error:
                raise DownloadError(f'cannot make the download directory: {error}') from None
            self._document = download(self.url, directory, self._max_document_size, self._download_timeout)
            if self._job.meta.get('phase') == 'received':
                save_meta(self._job, phase='started')
        return self._document

    def set_progress(self, current):
        """Report progress, an int from 0 to 100; the status route then answers PROGRESS."""
        if not isinstance(current, int) or isinstance(current, bool):
            raise TypeError(f'progress must be an int, not {type(current).__name__}')
        if not 0 <= current <= 100:
            raise ValueError(f'progress must be between 0 and 100, not {current}')
        values = {'phase': 'progress', 'progress': current}
        if self._job.meta.get('progress_from') is None:  # the gateway's ETA counts the pace from here
            values['progress_from'] = [time.time(), current]
        save_meta(self._job, **values)


def job_directory(uuid):
    """Where a job's document goes. The worker removes it when the job ends, even when the
    job's process was killed; made with os.mkdir, so a planted link there is refused."""
    return Path(tempfile.gettempdir(), f'gateway-job-{uuid}')


def save_meta(job, **values):
    """Record the job's phase and figures in its RQ meta, where the gateway reads them."""
    job.meta.update(values)
    job.save_meta()


# HTTP: documents, annotation store, callbacks ----------------------------------------------

def http_session(retries):
    """A requests session that retries connection failures, timeouts and 502/503/504
    (urllib3's Retry: the first retry at once, then 1 s, 2 s, 4 s ... apart, whatever a
    Retry-After header asks, which could hold the worker for hours)."""
    session = requests.Session()
    retry = HTTPRetry(total=retries, backoff_factor=0.5, allowed_methods=None, respect_retry_after_header=False,
                      status_forcelist=(502, 503, 504), raise_on_status=False)
    session.mount('http://', HTTPAdapter(max_retries=retry))
    session.mount('https://', HTTPAdapter(max_retries=retry))
    return session


def download(url, directory, max_size, timeout):
    """Download ``url`` into ``directory`` within ``max_size`` bytes and ``timeout`` seconds.

    The file keeps the URL's extension, which some tools go by, but not its name.
    """
    if urlsplit(url).scheme not in ('http', 'https'):
        raise DownloadError(f'only http and https documents can be downloaded, not {url}')
    suffix = Path(urlsplit(url).path).suffix
    path = Path(directory, 'document' + (suffix if re.fullmatch(r'\.[A-Za-z0-9]{1,10}', suffix) else ''))
    deadline = time.monotonic() + timeout
    too_large = DownloadError(f'document larger than the service accepts ({max_size} bytes)')
    # Three attempts, each connecting and getting the headers within a third of the time
    # limit, fit in it (plus urllib3's 1 s back-off); each read of the body then waits as
    # long at most, so that the deadline is checked even on a trickle.
    attempt_timeout = urllib3.Timeout(total=min(timeout / 3, 10))
    try:
        with http_session(retries=2) as session, \
                session.get(url, stream=True, timeout=attempt_timeout) as response:
            if response.status_code >= 400:
                raise DownloadError(f'document download failed: HTTP {response.status_code} from {url}')
            if int(response.headers.get('Content-Length') or 0) > max_size:
                raise too_large
            with open(path, 'wb') as file:
                size = 0
                while chunk := response.raw.read1(64 * 1024, decode_content=True):
                    size += len(chunk)
                    if size > max_size:
                        raise too_large
                    if time.monotonic() > deadline:
                        raise DownloadError(f'document download took longer than {timeout} s')
                    file.write(chunk)
    except (requests.RequestException, urllib3.exceptions.HTTPError, ValueError) as error:
        raise DownloadError(f'document download failed: {error}') from None
    return str(path)


def store_annotations(url, annotations, timeout, retries):
    """POST the annotations to the annotation store, retrying timeouts and refusals."""
    try:
        with http_session(retries) as session:
            response = session.post(url, json={'common': {}, 'data': annotations}, timeout=timeout)
    except (requests.RequestException, ValueError) as error:
        raise StorageError(f'annotation upload failed: {error}') from None
    if not response.ok:
        raise StorageError(f'annotation upload failed: HTTP {response.status_code} from {url}')


def send_callback(url, uuid, status):
    """POST ``{"uuid", "status"}`` to a client's callback URL. A failure is logged, never
    raised: a callback must not change how its job ended."""
    settings = current_settings()
    try:
        with http_session(settings.callback_retries) as session:
            session.post(url, json={'uuid': uuid, 'status': status},
                         timeout=settings.storage_timeout).raise_for_status()
    except Exception as error:
        log.warning('callback for job %s to %s failed: %s', uuid, url, error)


# The job ----------------------------------------------------------------------------------

def perform_request(message):
    """The RQ job of every submission: run the service, then store its annotations.

    Phases are recorded in the job's meta so that the gateway can tell RECEIVED,
    STARTED, PROGRESS and STORING apart; a failure is recorded with its code before
    RQ marks the job failed (or schedules its retry).
    """
    job = get_current_job()
    service = current_settings().services[message['service']['type']]
    request = Request(job, message, service)
    try:
        save_meta(job, phase='started', progress=None, progress_from=None, failure=None,
                  worker={'worker_id_version': service.version, 'host': socket.gethostname()})
        annotations = service_function(service.function)(request)
        if not isinstance(annotations, list):
            raise AnnotationFormatError(f'annotations must be a list, not {type(annotations).__name__}')
        try:
            # Plain JSON values from here on: RQ pickles the result, and the gateway could not
            # unpickle a subclass of the service's (a numpy float, say).
            annotations = json.loads(json.dumps(annotations, allow_nan=False))
        except (TypeError, ValueError, RecursionError) as error:
            raise AnnotationFormatError(f'annotations are not JSON: {error}') from None
        store_url = message['annotation_service']['url']
        if store_url:
            save_meta(job, phase='storing')
            settings = current_settings()
            store_annotations(store_url, annotations, settings.storage_timeout, settings.storage_retries)
        return annotations
    except Exception as error:
        save_meta(job, failure=failure_of(error, service))
        raise


# The worker -------------------------------------------------------------------------------

class GatewayWorker(Worker):
    """An RQ worker that finishes what a job leaves behind, even when its work horse dies:
    the job's failure, its download directory, its uuid record and its callback.

    RQ's job callbacks run before the job's end is saved, so a client polling on a
    callback could still read STARTED; ``job_ended`` runs once the end is saved.
    """

    def execute_job(self, job, queue):
        try:
            super().execute_job(job, queue)
        finally:
            shutil.rmtree(job_directory(job.id), ignore_errors=True)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        super().handle_job_success(job, queue, started_job_registry, execution)
        self.job_ended(job, 'SUCCESS')

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        """The work horse died (killed, out of memory) without recording why: record it.
        This process holds the job as it was dequeued, so it first reloads what the horse
        recorded, which RQ then saves back."""
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        job.get_meta(refresh=True)
        if not job.meta.get('failure'):
            cause = (f'signal {os.WTERMSIG(ret_val)}' if os.WIFSIGNALED(ret_val)
                     else f'exit status {os.waitstatus_to_exitcode(ret_val)}')
            save_meta(job, failure={'code': 306, 'message': f'the service process ended unexpectedly ({cause})'})

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string='', execution=None):
        if job.should_retry:  # the next attempt must not show this one's progress; RQ saves the job
            job.meta.update(phase=None, progress=None, progress_from=None)
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        status = {JobStatus.FAILED: 'FAILURE', JobStatus.STOPPED: 'REVOKED'}.get(job.get_status(refresh=True))
        if status:  # otherwise RQ has scheduled a retry
            self.job_ended(job, status)

    def job_ended(self, job, status):
        """Record a submission's end (its duration, its uuid record's expiry), then call back."""
        service = job.meta.get('service')
        if service is None:  # not a submission: a callback sent for a job cancelled in its queue
            return
        with self.connection.pipeline() as pipe:
            # The uuid record must outlive the job's result, which expires result_ttl from now.
            pipe.expire(uuid_key(job.id), current_settings().uuid_ttl)
            if status != 'REVOKED' and job.started_at and job.ended_at:
                record_duration(pipe, service, (job.ended_at - job.started_at).total_seconds())
            pipe.execute()
        if job.meta.get('callback_url'):
            send_callback(job.meta['callback_url'], job.id, status)


class EmbeddedRedisWorker(GatewayWorker):
    """GatewayWorker for the embedded in-memory Redis (fakeredis's TCP server).

    fakeredis 2.41 answers CLIENT INFO with an address redis-py cannot parse, and
    RQ's worker dies reading it at start-up; here the address is simply unknown.
    tests/test_embedded.py says when fakeredis no longer needs this.
    """

    def _set_ip_address(self, connection):
        self.ip_address = 'unknown'


def main(argv=None):
    parser = argparse.ArgumentParser(description='Run an RQ worker for the given services.')
    parser.add_argument('services', nargs='+', metavar='SERVICE', help='a [service:NAME] of settings.ini')
    args = parser.parse_args(argv)
    with exit_on_settings_error():
        settings = current_settings()
        require_redis_url(settings)
        unknown = [name for name in args.services if name not in settings.services]
        if unknown:
            raise SettingsError(f'unknown service {unknown[0]!r} (configured: {", ".join(settings.services)})')
        services = [settings.services[name] for name in args.services]
        for service in services:
            try:
                service_function(service.function)
            except (ImportError, AttributeError, ValueError) as error:
                raise SettingsError(f'[service:{service.name}] function: cannot import '
                                    f'{service.function!r}: {error}') from None

    worker_class = EmbeddedRedisWorker if os.environ.get('GATEWAY_EMBEDDED_REDIS') else GatewayWorker
    connection = worker_redis(settings)
    queues = list(dict.fromkeys(service.queue for service in services))  # in the order given
    # Heartbeats every worker_ttl - 15 s when idle, every worker_ttl / 2 s at most when busy, so
    # that the gateway counts a worker as live while its last heartbeat is under worker_ttl old.
    worker = worker_class(queues, connection=connection, worker_ttl=settings.worker_ttl,
                          job_monitoring_interval=min(30, settings.worker_ttl // 2))
    # RQ lists a queue (for rq-dashboard, `rq info`) once a job is put on it; list the worker's
    # queues from its start, so that operators see an idle service too.
    connection.sadd(Queue.redis_queues_keys, *(queue.key for queue in worker.queues))
    worker.work(with_scheduler=True, logging_level=os.environ.get('LOG_LEVEL', 'INFO'))


if __name__ == '__main__':
    # Run as the module `worker`, the name RQ resolves 'worker.perform_request' with,
    # so that the job and the worker share one copy of this module.
    import worker
    worker.main()
