"""The Service Gateway: a REST front to per-service RQ queues.

Clients submit a document to a service and get a job uuid at once; ``worker.py``
processes of that service run the job; clients poll the status route or get a
callback. ``../shared/SPEC.md`` is the contract; the README is the manual.

    waitress-serve --port=$PORT app:app     the gateway (REDIS_URL names Redis)
    python app.py                           everything on one machine: embedded
                                            in-memory Redis, one worker per service
    python app.py token [--ttl SECONDS]     print a valid JWT

The file reads top to bottom: settings, errors, auth, job states, submissions,
API description, routes, CANARIE pages, monitoring, main.
"""

import argparse
import configparser
import functools
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, urlsplit
from uuid import UUID, uuid4
from xml.etree import ElementTree

import bottle
import jwt
import markdown
import redis
from bottle import HTTPError, request, response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from rq import Queue, Retry, Worker
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from capacity import live_workers, load_of, plan, read_figures
from records import invocations, record_submission, utc_text, uuid_key
from settings import (
    CANARIE_FIELDS,
    CANARIE_PAGES,
    exit_on_settings_error,
    gateway_redis,
    load_settings,
    require_jwt_secret,
    require_redis_url,
)

log = logging.getLogger('gateway')
HERE = Path(__file__).parent


# Settings ---------------------------------------------------------------------------------

with exit_on_settings_error():
    settings = load_settings()
    # `python app.py` runs everything itself (embedded Redis, its own secret) or checks these
    # in main(); every other way of serving app:app must be given both.
    if __name__ != '__main__':
        require_jwt_secret(settings)
        require_redis_url(settings)

# No Redis, and so no queues, only for `python app.py` without REDIS_URL, which serves
# nothing itself: it starts the processes that do (see main).
redis_db = gateway_redis(settings) if settings.redis_url else None
queues = {name: Queue(service.queue, connection=redis_db)
          for name, service in settings.services.items()} if redis_db else {}
# Bottle parses form bodies up to this size; request_body() refuses larger ones first.
bottle.BaseRequest.MEMFILE_MAX = settings.max_content_length


# Errors -----------------------------------------------------------------------------------

HTTP_STATUS = {101: 500, 200: 500, 202: 404, 203: 404, 204: 500, 205: 503, 206: 400, 207: 400,
               208: 401, 209: 413, 210: 400}
# Codes of the errors bottle raises itself (no route, wrong method, unparsable form body).
CODE_OF_HTTP_STATUS = {400: 206, 404: 202, 405: 202, 413: 209}


class GatewayError(HTTPError):
    """An error answered to the client with its code of SPEC section 6."""

    def __init__(self, code, message, **headers):
        super().__init__(HTTP_STATUS[code], message, **headers)
        self.code = code


def render_error(error):
    """Bottle's error handler: every error is the SPEC's document, never a stack trace."""
    code = getattr(error, 'code', None) or CODE_OF_HTTP_STATUS.get(error.status_code, 101)
    message = error.body if isinstance(error.body, str) and error.body else error.status_line
    if error.status_code >= 500 and not isinstance(error, GatewayError):
        message = 'unexpected error'  # bottle's own 500 carries the exception text
    description = error.status_line.partition(' ')[2]
    document = {'status': error.status_code, 'description': description, 'vesta': {'code': code, 'message': message}}
    return (negotiated(document, 'error', 'application/json', 'text/html', 'application/xml')
            or bottle.template('error', status=error.status_code, description=description, message=message,
                               code=code))


def redis_unavailable(error):
    """Redis errors that mean "not now" to a client: down, hung, out of memory, read-only, unable to save."""
    return (isinstance(error, (redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError,
                               redis.exceptions.ReadOnlyError))
            or isinstance(error, redis.ResponseError) and str(error).startswith('MISCONF'))


def translate_errors(route):
    """Bottle plugin: Redis unavailable becomes 503/205, anything unforeseen 500/101 (logged here)."""

    def wrapper(*args, **kwargs):
        try:
            return route(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except redis.RedisError as error:
            if not redis_unavailable(error):
                raise
            log.warning('Redis unavailable: %s', error)
            raise GatewayError(205, 'the queue backend (Redis) is unavailable, retry later') from None
        except Exception:
            log.exception('unexpected error on %s %s', request.method, request.path)
            raise GatewayError(101, 'unexpected error') from None

    return wrapper


def preferred_type(*offered):
    """The offered media type the client's Accept header ranks highest; at equal quality the
    one it names rather than matches by a wildcard, then the first offered."""
    response.set_header('Vary', 'Accept')  # the answer depends on it: caches must know
    ranges = []
    for part in request.get_header('Accept', '').split(','):
        media, *params = [item.strip() for item in part.split(';')]
        quality = next((value for name, _, value in (p.partition('=') for p in params) if name == 'q'), '1')
        try:
            ranges.append((media.lower(), float(quality)))
        except ValueError:
            continue

    def rank(kind):
        """(quality, specificity) of the most specific range that matches ``kind``."""
        wildcard = kind.split('/')[0] + '/*'
        specificity, q = max(((2 if media == kind else 1 if media == wildcard else 0, q)
                              for media, q in ranges if media in (kind, wildcard, '*/*')), default=(0, 0))
        return q, specificity

    ranks = {kind: rank(kind) for kind in offered}
    best = max(offered, key=ranks.get)  # the first offered of equal ranks
    return best if ranks[best][0] > 0 else offered[0]


def negotiated(document, root, *offered):
    """``document`` as JSON or XML, whichever of ``offered`` the client prefers, with its
    content type set; None when it prefers HTML, which the caller renders."""
    kind = preferred_type(*offered)
    response.content_type = f'{kind}; charset=utf-8'
    return None if kind == 'text/html' else serialize(document, kind, root)


def serialize(document, kind, root):
    """The document as JSON or as XML (``<root>``, one element per key, ``<item>`` per list entry)."""
    if kind != 'application/xml':
        return json.dumps(document)
    return ElementTree.tostring(_xml_element(root, document), encoding='unicode', xml_declaration=True)


XML_NAME = re.compile(r'^(?!xml)[A-Za-z_][\w.-]*$', re.IGNORECASE)


def _xml_element(name, value):
    # Keys that are no XML names (an annotation's "@id") become <field name="@id">.
    element = ElementTree.Element(name) if XML_NAME.match(name) else ElementTree.Element('field', name=name)
    if isinstance(value, dict):
        element.extend(_xml_element(str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        element.extend(_xml_element('item', item) for item in value)
    elif isinstance(value, bool):
        element.text = 'true' if value else 'false'
    elif value is not None:
        element.text = str(value)
    return element


# Auth -------------------------------------------------------------------------------------

def require_token():
    """Check the JWT of ``Authorization`` (bare or ``Bearer``): signature, algorithm, aud, exp."""
    if settings.auth_bypass:
        return
    header = request.get_header('Authorization', '').strip()
    scheme, _, rest = header.partition(' ')
    token = rest.strip() if scheme.lower() == 'bearer' else header
    challenge = {'WWW-Authenticate': 'Bearer'}
    if not token:
        raise GatewayError(208, 'missing Authorization header with a JWT', **challenge)
    try:
        jwt.decode(token, settings.jwt_secret, algorithms=[settings.jwt_algorithm], audience=settings.jwt_audience,
                   leeway=10, options={'require': ['exp', 'aud']})
    except jwt.InvalidTokenError as error:
        raise GatewayError(208, f'invalid token: {error}', **challenge) from None


def make_token(secret, ttl):
    """A token this gateway accepts for ``ttl`` seconds."""
    now = int(time.time())
    claims = {'aud': settings.jwt_audience, 'iat': now, 'exp': now + ttl, 'sub': 'service-gateway client'}
    return jwt.encode(claims, secret, algorithm=settings.jwt_algorithm)


# Job states -------------------------------------------------------------------------------

PHASES = {'received': 'RECEIVED', 'started': 'STARTED', 'progress': 'PROGRESS', 'storing': 'STORING'}


def service_named(name):
    if name not in settings.services:
        raise GatewayError(202, f'unknown service {name!r}')
    return settings.services[name]


def requested_uuid(service):
    """The ``uuid`` query parameter, normalised; 400/206 when missing, 404/203 when no uuid at all."""
    value = request.query.get('uuid')
    if not value:
        raise GatewayError(206, 'missing parameter uuid')
    try:
        return str(UUID(value))
    except ValueError:
        raise GatewayError(203, f'unknown uuid {value!r} for service {service.name!r}') from None


def owned_job(service, uuid):
    """The job of ``uuid`` if this service issued it, None if its record expired; else 404/203."""
    try:
        job = Job.fetch(uuid, connection=redis_db)
    except NoSuchJobError:
        job = None
    owner = job.meta.get('service') if job else (redis_db.get(uuid_key(uuid)) or b'').decode()
    if owner != service.name:
        raise GatewayError(203, f'unknown uuid {uuid!r} for service {service.name!r}')
    return job


def job_state(service, uuid, job):
    """``{"uuid", "status", "result"}`` of SPEC section 5, read from RQ's status and the job's meta."""
    if job is None:
        return {'uuid': uuid, 'status': 'EXPIRED', 'result': None}
    status, meta = job.get_status(refresh=False), job.meta
    failure = meta.get('failure')
    if status == JobStatus.FINISHED:
        state, result = 'SUCCESS', job.return_value()
    elif status == JobStatus.FAILED:
        state, result = 'FAILURE', failure or abandoned_failure(job)
    elif status == JobStatus.CANCELED:
        state, result = 'REVOKED', {'code': 109, 'message': 'revoked'}
    elif status == JobStatus.STOPPED:
        state, result = 'REVOKED', {'code': 109, 'message': 'terminated'}
    elif status == JobStatus.STARTED:  # its meta tells how far the worker got
        state = PHASES.get(meta.get('phase'), 'RECEIVED')
        worker = dict(meta.get('worker') or {}, start_time=utc_text(job.started_at), type=service.name)
        result = (dict(current=meta['progress'], total=100, **worker,
                       eta=progress_eta(meta)) if state == 'PROGRESS'
                  else worker if state == 'STORING' else None)
        if state == 'PROGRESS' and worker['worker_id_version'] != service.version:
            raise GatewayError(204, f'worker version {worker["worker_id_version"]!r} does not match service '
                                    f'version {service.version!r}')
    else:  # queued, or scheduled for a retry
        state, result = ('RETRY', failure) if failure else ('PENDING', place_in_queue(service, job))
    return {'uuid': uuid, 'status': state, 'result': result}


POSITIONS_SEARCHED = 10_000  # LPOS is linear in the queue: further back, the position is unknown


def place_in_queue(service, job):
    """A waiting job's ``position`` (1 = next to be taken) and ``eta``, the seconds until it is
    expected to start: the jobs ahead of it that idle workers cannot take at once, each
    lasting the service's mean duration, shared among its live workers. None where a figure
    is unknown (no live worker, no finished job yet, a job between queue and worker)."""
    index = redis_db.lpos(queues[service.name].key, job.id, maxlen=POSITIONS_SEARCHED)
    if index is None:
        return {'position': None, 'eta': None}
    figures = read_figures(redis_db, settings, [service])[service.name]
    position = index + 1
    if not figures.workers or figures.mean_duration is None:
        return {'position': position, 'eta': None}
    ahead = max(0, position - (figures.workers - figures.busy))
    return {'position': position, 'eta': round(ahead * figures.mean_duration / figures.workers, 1)}


def progress_eta(meta):
    """Seconds until a job in PROGRESS completes, if it keeps the pace it had since its first
    progress report (not since it started: a download or a slow set-up would skew it); None
    until progress has moved past that first report."""
    since, first = meta.get('progress_from') or (None, None)
    current = meta['progress']
    if since is None or current <= first:
        return None
    return round(max(0.0, time.time() - since) * (100 - current) / (current - first), 1)


def abandoned_failure(job):
    """The failure of a job whose worker died with it, as RQ recorded it."""
    latest = job.latest_result()
    reason = (latest.exc_string or '').strip().splitlines()[-1:] if latest else []
    return {'code': 306, 'message': f'the worker running the service stopped: {"".join(reason) or "unknown cause"}'}


def revoke(service, job, wait=3.0):
    """Cancel a job: take it off its queue if no worker has it yet (REVOKED/revoked), else
    have its worker kill the work horse (REVOKED/terminated). Waits up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = job.get_status()
        if status == JobStatus.STARTED:
            try:
                send_stop_job_command(redis_db, job.id)
            except InvalidJobOperation:
                pass  # it ended meanwhile
            while job.get_status() == JobStatus.STARTED and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        if status not in (JobStatus.QUEUED, JobStatus.SCHEDULED) or take_off_queue(service, job, status):
            return
        time.sleep(0.05)  # a worker popped it and is about to mark it started


def take_off_queue(service, job, status):
    """Cancel a waiting job atomically, unless a worker (or RQ's scheduler) takes it first."""
    queue = queues[service.name]
    holder = queue.scheduled_job_registry.key if status == JobStatus.SCHEDULED else queue.key
    with redis_db.pipeline() as pipe:
        try:
            pipe.watch(holder)
            waiting = (pipe.zscore(holder, job.id) if status == JobStatus.SCHEDULED
                       else pipe.lpos(holder, job.id)) is not None
            if not waiting:
                return False
            pipe.multi()
            job.cancel(pipeline=pipe)
            pipe.expire(job.key, settings.result_ttl)  # RQ gives a cancelled job no expiry
            pipe.expire(uuid_key(job.id), settings.uuid_ttl)
            callback_url = job.meta.get('callback_url')
            if callback_url:  # the job never reaches a worker, so a worker is sent to tell the client
                queue.enqueue('worker.send_callback', callback_url, job.id, 'REVOKED', at_front=True,
                              result_ttl=0, pipeline=pipe)
            pipe.execute()
            return True
        except (redis.WatchError, InvalidJobOperation):  # taken, or cancelled by a concurrent request
            return False


# Submissions ------------------------------------------------------------------------------

RESERVED_FIELDS = ('doc_url', 'ann_doc_id', 'callback_url', 'storage_doc_id')
STORAGE_ID = re.compile(r'^storage_(\w+)_id$')


def request_body():
    """The request body, refused with 413/209 past ``max_content_length``."""
    limit = settings.max_content_length
    if request.content_length > limit or len(body := request.body.read(limit + 1)) > limit:
        raise GatewayError(209, f'request body larger than {limit} bytes')
    return body


def fields_of(*forms):
    """The fields of bottle FormsDicts, decoded; a field given several times is a list."""
    fields = {}
    try:
        for key, value in (pair for form in forms for pair in form.decode().allitems()):
            if key in fields:
                previous = fields[key]
                fields[key] = (previous if isinstance(previous, list) else [previous]) + [value]
            else:
                fields[key] = value
    except UnicodeError:
        raise GatewayError(206, 'parameters must be UTF-8') from None
    return fields


def last_value(fields, name):
    value = fields.pop(name, None)
    return value[-1] if isinstance(value, list) else value


MAX_JSON_DEPTH = 100  # deeper, RQ could not pickle the job (Python's recursion limit)
TOO_DEEP = f'body is not valid JSON: nested deeper than {MAX_JSON_DEPTH} levels'


def finite_number(text):
    """A JSON number as a float. NaN, Infinity and numbers beyond a float's range, which
    Python's json would take, are refused: the job must be JSON all the way."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f'{text} is not a finite number')
    return number


def json_depth(document):
    """How deeply ``document`` nests, counted level by level (no recursion)."""
    depth, level = 0, [document]
    while level:
        depth += 1
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
    return depth


def json_body():
    """The request body parsed as a JSON object (an empty body is an empty object)."""
    body = request_body()
    try:
        document = json.loads(body, parse_float=finite_number, parse_constant=finite_number) if body.strip() else {}
    except (ValueError, UnicodeError) as error:
        raise GatewayError(210, f'body is not valid JSON: {error}') from None
    except RecursionError:
        raise GatewayError(210, TOO_DEEP) from None
    if json_depth(document) > MAX_JSON_DEPTH:
        raise GatewayError(210, TOO_DEEP)
    if not isinstance(document, dict):
        raise GatewayError(210, 'body must be a JSON object')
    return document


def check_url(name, value):
    """Refuse what a worker could not fetch: anything but an http(s) URL with a valid host and port."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number in 0-65535
        parts.hostname.encode('idna')  # raises UnicodeError for an empty or overlong label
    except (ValueError, AttributeError, TypeError):
        parts = None
    if not parts or parts.scheme not in ('http', 'https') or not parts.hostname or re.search(r'\s', value):
        raise GatewayError(207, f'{name} must be an http or https URL, not {value!r}')


def storage_url(setting, value, name):
    """The URL the ``[storage]`` template ``setting`` gives for the id ``value`` of field ``name``."""
    template = getattr(settings, setting)
    if not template:
        raise GatewayError(200, f'{name} needs [storage] {setting} in the settings')
    if not isinstance(value, str) or not value:
        raise GatewayError(206, f'{name} must be a non-empty string')
    placeholder = 'storage_doc_id' if setting == 'get_storage_doc_url' else 'ann_doc_id'
    return template.format(**{placeholder: quote(value, safe='')})


def document_url(doc_url, storage_doc_id):
    if storage_doc_id is None:
        return doc_url
    if doc_url is not None:
        raise GatewayError(207, 'give doc_url or a storage document id, not both')
    return storage_url('get_storage_doc_url', storage_doc_id, 'storage_doc_id')


def annotate_request(storage_doc_id):
    """The reserved fields and the service's ``misc`` of an ``annotate`` form (and query)."""
    request_body()
    fields = fields_of(request.query, request.forms)
    # An empty field is an absent one, as an HTML form sends the fields left blank.
    doc_url, ann_doc_id, callback_url, storage_field = (last_value(fields, name) or None
                                                        for name in RESERVED_FIELDS)
    misc = {}
    for name, value in fields.items():
        if match := STORAGE_ID.match(name):
            name, value = f'{match[1]}_url', storage_url('get_storage_doc_url', value, name)
        elif name.endswith('_url'):
            check_url(name, value)
        misc[name] = value
    return document_url(doc_url, storage_doc_id or storage_field), ann_doc_id, callback_url, misc


def process_request(storage_doc_id):
    """The reserved fields of a ``process`` JSON body (or query), and the body itself as ``misc``."""
    body = json_body()
    query = fields_of(request.query)
    doc_url, ann_doc_id, callback_url, storage_field = (
        body.get(name) if body.get(name) not in (None, '') else last_value(query, name) or None
        for name in RESERVED_FIELDS)
    return document_url(doc_url, storage_doc_id or storage_field), ann_doc_id, callback_url, body


def accept_job(service, doc_url, ann_doc_id, callback_url, misc):
    """Check a submission, queue it and answer 202 with its uuid and status URL."""
    if doc_url is None and not service.noparams:
        raise GatewayError(206, 'missing parameter doc_url (or a storage document id)')
    if doc_url is not None:
        check_url('doc_url', doc_url)
    if callback_url is not None:
        check_url('callback_url', callback_url)
    store_url = storage_url('post_annotations_url', ann_doc_id, 'ann_doc_id') if ann_doc_id is not None else None
    uuid = str(uuid4())
    message = {
        'request_time': utc_text(datetime.now(timezone.utc)),
        'service': {'type': service.name, 'misc': misc, 'document': {'url': doc_url, 'credentials': None}},
        'annotation_service': {'url': store_url, 'uuid': ann_doc_id, 'credentials': None},
    }
    with redis_db.pipeline() as pipe:  # the uuid record and the job are written together or not at all
        pipe.multi()
        pipe.set(uuid_key(uuid), service.name, ex=settings.uuid_ttl)
        record_submission(pipe, service.name)
        queues[service.name].enqueue(
            'worker.perform_request', message, job_id=uuid, description=f'{service.name} {doc_url or ""}',
            job_timeout=service.timeout, result_ttl=settings.result_ttl, failure_ttl=settings.result_ttl,
            retry=Retry(max=service.retries, interval=service.retry_interval) if service.retries else None,
            meta={'service': service.name, 'callback_url': callback_url}, pipeline=pipe)
        pipe.execute()
    response.status = 202
    response.set_header('Location', status_url(service, uuid))
    return {'uuid': uuid}


def status_url(service, uuid):
    # request.urlparts honours X-Forwarded-* only from a proxy waitress was told to trust.
    path = f'{request.script_name}{service.name}/status'
    return request.urlparts._replace(path=path, query=f'uuid={uuid}').geturl()


def job_response(document):
    return negotiated(document, 'job', 'application/json', 'application/xml')


# API description --------------------------------------------------------------------------
# Every route carries its OpenAPI operation (``described``); /openapi.json is assembled from
# the routes themselves, and refuses to be assembled while a route lacks one.

STRING = {'schema': {'type': 'string'}}
HTML, XML, TEXT = ({media: STRING} for media in ('text/html', 'application/xml', 'text/plain'))
ERROR_CONTENT = {'application/json': {'schema': {'$ref': '#/components/schemas/Error'}}, **HTML, **XML}
SCHEMAS = {
    'Error': {'type': 'object', 'required': ['status', 'description', 'vesta'], 'properties': {
        'status': {'type': 'integer'}, 'description': {'type': 'string'},
        'vesta': {'type': 'object', 'required': ['code', 'message'], 'properties': {
            'code': {'type': 'integer', 'description': 'SPEC section 6'}, 'message': {'type': 'string'}}}}},
    'Accepted': {'type': 'object', 'required': ['uuid'], 'properties': {'uuid': {'type': 'string', 'format': 'uuid'}}},
    'Job': {'type': 'object', 'required': ['uuid', 'status', 'result'], 'properties': {
        'uuid': {'type': 'string', 'format': 'uuid'},
        'status': {'type': 'string', 'enum': ['PENDING', 'RECEIVED', 'STARTED', 'PROGRESS', 'STORING', 'SUCCESS',
                                              'FAILURE', 'RETRY', 'REVOKED', 'EXPIRED']},
        'result': {'anyOf': [
            {'type': 'null', 'description': 'RECEIVED, STARTED, EXPIRED'},
            {'type': 'array', 'description': 'SUCCESS: the annotations'},
            {'type': 'object', 'description': 'PENDING', 'required': ['position', 'eta'], 'properties': {
                'position': {'type': ['integer', 'null'], 'minimum': 1}, 'eta': {'type': ['number', 'null']}}},
            {'type': 'object', 'description': 'PROGRESS (current, total, eta too) and STORING',
             'required': ['worker_id_version', 'start_time', 'host', 'type'], 'properties': {
                 'current': {'type': 'integer', 'minimum': 0, 'maximum': 100}, 'total': {'const': 100},
                 'eta': {'type': ['number', 'null']}, 'worker_id_version': {'type': 'string'},
                 'start_time': {'type': 'string'}, 'host': {'type': 'string'}, 'type': {'type': 'string'}}},
            {'type': 'object', 'description': 'FAILURE, RETRY, REVOKED', 'required': ['code', 'message'],
             'properties': {'code': {'type': 'integer'}, 'message': {'type': 'string'}}}]}}},
    'Fields': {'type': 'object', 'additionalProperties': True, 'properties': {
        'doc_url': {'type': 'string', 'format': 'uri'}, 'ann_doc_id': {'type': 'string'},
        'callback_url': {'type': 'string', 'format': 'uri'}, 'storage_doc_id': {'type': 'string'}}},
    'Info': {'type': 'object', 'required': list(CANARIE_FIELDS), 'additionalProperties': False, 'properties': {
        **{key: {'type': 'string'} for key in CANARIE_FIELDS}, 'tags': {'type': 'array', 'items': {'type': 'string'}},
        'activeWorkers': {'type': 'integer', 'description': 'services only'}}},
    'Stats': {'type': 'object', 'required': ['invocations', 'lastReset'], 'additionalProperties': False,
              'properties': {
        'invocations': {'type': 'integer'}, 'lastReset': {'type': 'string', 'format': 'date-time'}}},
}


def json_content(schema):
    return {'application/json': {'schema': {'$ref': f'#/components/schemas/{schema}'}}}


def errors(*statuses):
    return {str(status): {'description': bottle.HTTP_CODES[status], 'content': ERROR_CONTENT} for status in statuses}


def query_parameter(name, description, required=False, **schema):
    return {'name': name, 'in': 'query', 'required': required, 'description': description,
            'schema': {'type': 'string', **schema}}


def described(summary, responses, query=(), body=None, secured=False, head=True):
    """Attach a route's OpenAPI operation to it: ``query`` its query parameters, ``body`` its
    request body. A GET route is described for HEAD as well, which bottle answers for it,
    unless ``head`` is false (the route refuses HEAD)."""

    def attach(route):
        route.openapi = {'summary': summary, 'responses': responses, 'secured': secured, 'query': list(query),
                         'body': body, 'head': head}
        return route

    return attach


# A wildcard of a route rule: its name, and its choices when it is a ``re:a|b|c`` filter.
ROUTE_WILDCARD = re.compile(r'<(\w+)(?::re:([\w|]+)|:[^>]*)?>')


def openapi_document():
    """The OpenAPI 3.1 description of every route, assembled from the routes."""
    paths = {}
    for route in app.routes:
        operation = getattr(route.callback, 'openapi', None)
        if operation is None:
            raise RuntimeError(f'route {route.method} {route.rule} has no OpenAPI description')
        path = ROUTE_WILDCARD.sub(r'{\1}', route.rule)
        parameters = [{'name': name, 'in': 'path', 'required': True, 'schema': {'type': 'string', **(
                           {'enum': choices.split('|')} if choices else
                           {'enum': list(settings.services)} if name == 'service_name' else {})}}
                      for name, choices in ROUTE_WILDCARD.findall(route.rule)]
        entry = {'summary': operation['summary'],
                 'operationId': route.method.lower() + re.sub(r'\W+', '_', path).rstrip('_'),
                 'parameters': parameters + operation['query'], 'responses': operation['responses']}
        if operation['body']:
            entry['requestBody'] = operation['body']
        if operation['secured']:
            entry['security'] = [{'jwt': []}]
        paths.setdefault(path, {})[route.method.lower()] = entry
        if route.method == 'GET' and operation['head']:
            paths[path]['head'] = dict(entry, operationId=entry['operationId'] + '_head', responses={
                code: {'description': answer['description']} for code, answer in entry['responses'].items()})
    operations = [entry for methods in paths.values() for entry in methods.values()]
    linked = {link['operationId'] for entry in operations for answer in entry['responses'].values()
              for link in answer.get('links', {}).values()}
    if linked - {entry['operationId'] for entry in operations}:
        raise RuntimeError(f'links to operations that do not exist: {sorted(linked)}')
    return {
        'openapi': '3.1.0',
        'info': {'title': settings.info.get('name', 'Service Gateway'), 'version': settings.info.get('version', '0'),
                 'description': settings.info.get('synopsis', '')},
        'paths': paths,
        'components': {'schemas': SCHEMAS, 'securitySchemes': {'jwt': {
            'type': 'http', 'scheme': 'bearer', 'bearerFormat': 'JWT',
            'description': 'Authorization: Bearer <token>, or the bare token'}}},
    }


# Routes -----------------------------------------------------------------------------------

app = bottle.Bottle()
app.install(translate_errors)
app.default_error_handler = render_error
bottle.TEMPLATE_PATH.insert(0, str(HERE / 'views'))

SUBMITTED = {'202': {'description': 'Queued; Location is the status URL', 'content': json_content('Accepted'),
                     'headers': {'Location': STRING},
                     'links': {name: {'operationId': operation, 'parameters': {
                         'service_name': '$request.path.service_name', 'uuid': '$response.body#/uuid'}}
                         for name, operation in (('status', 'get_service_name_status'),
                                                 ('cancel', 'post_service_name_cancel'))}},
             **errors(400, 401, 404, 413, 500, 503)}
JOB_STATE = {'200': {'description': 'The job\'s state (SPEC section 5)', 'content': {
    **json_content('Job'), **XML}}}
RESERVED_QUERY = (query_parameter('doc_url', 'the document, an http(s) URL', format='uri'),
                  query_parameter('ann_doc_id', 'post the annotations to [storage] post_annotations_url'),
                  query_parameter('callback_url', 'POSTed {"uuid", "status"} when the job ends', format='uri'))
UUID_QUERY = [query_parameter('uuid', 'as the submission answered', required=True, format='uuid')]


@app.post('/<service_name>/annotate')
@app.post('/<service_name>/annotate/<storage_doc_id>')
@described('Submit a document by form or query fields; other fields reach the service as misc', SUBMITTED,
           query=RESERVED_QUERY, secured=True, body={'content': {
               'application/x-www-form-urlencoded': {'schema': {'$ref': '#/components/schemas/Fields'}}}})
def annotate(service_name, storage_doc_id=None):
    service = service_named(service_name)
    require_token()
    return accept_job(service, *annotate_request(storage_doc_id))


@app.post('/<service_name>/process')
@app.post('/<service_name>/process/<storage_doc_id>')
@described('Submit a JSON object, passed whole to the service as misc', SUBMITTED, query=RESERVED_QUERY,
           secured=True, body={'content': {'application/json': {'schema': {'$ref': '#/components/schemas/Fields'}}}})
def process(service_name, storage_doc_id=None):
    service = service_named(service_name)
    require_token()
    return accept_job(service, *process_request(storage_doc_id))


@app.get('/<service_name>/status')
@described('The state of a job', {**JOB_STATE, **errors(400, 404, 500, 503)},
           query=UUID_QUERY)
def status(service_name):
    service = service_named(service_name)
    uuid = requested_uuid(service)
    return job_response(job_state(service, uuid, owned_job(service, uuid)))


@app.route('/<service_name>/cancel', method=['GET', 'POST'])
@described('Cancel a job, then answer its state', {**JOB_STATE, **errors(400, 401, 404, 500, 503)},
           query=UUID_QUERY, secured=True, head=False)
def cancel(service_name):
    service = service_named(service_name)
    if request.method == 'HEAD':  # bottle would run the GET route, and a HEAD must change nothing
        raise HTTPError(405, 'cancel takes GET or POST', Allow='GET, POST')
    require_token()
    uuid = requested_uuid(service)
    job = owned_job(service, uuid)
    if job is not None:
        revoke(service, job)
    return job_response(job_state(service, uuid, job))


# CANARIE pages ----------------------------------------------------------------------------

CANARIE_PAGE = f'<page:re:{"|".join(("info", "stats", *CANARIE_PAGES))}>'
# Each settings section's CANARIE pages: the gateway's, then each service's.
PAGE_SECTIONS = [('gateway', settings.pages),
                 *((f'service:{name}', service.pages) for name, service in settings.services.items())]


def canarie_page(service, page):
    """A CANARIE API page (SPEC section 7) of the gateway (``service`` None) or of a service."""
    if page in ('info', 'stats'):
        document = info_document(service) if page == 'info' else stats_document(service)
        title = f'{(service or settings).info["name"]}: {page}'
        return (negotiated(document, page, 'text/html', 'application/json')
                or bottle.template('canarie', title=title, document=document))
    setting = (service.pages if service else settings.pages).get(page)
    if setting is None:  # CANARIE expects 204 of an unpublished source; the other pages alike
        return bottle.HTTPResponse(status=204)
    if setting.kind == 'redirect':
        bottle.redirect(setting.value)
    if setting.kind == 'text':
        response.status = setting.status
        response.content_type = 'text/plain; charset=utf-8'
        return setting.value
    body = markdown_page(setting.value)
    if re.match(r'\s*<(!doctype|html)\b', body, re.IGNORECASE):  # a whole HTML document of its own
        return body
    return bottle.template('page', title=page, body=body)


@functools.cache
def markdown_page(path):
    """A page file rendered to HTML: Markdown (``.md``) is converted, anything else is taken as HTML."""
    text = Path(path).read_text(encoding='utf-8')
    return markdown.markdown(text, extensions=['tables', 'fenced_code']) if path.endswith('.md') else text


def info_document(service):
    """CANARIE info: exactly its fields, and a service's live workers."""
    document = dict((service or settings).info)  # the settings hold every CANARIE field
    if service:
        document['activeWorkers'], _ = live_workers(redis_db, settings, service)
    return document


def stats_document(service):
    """CANARIE stats; 503 for a service no live worker runs: CANARIE's monitor reads it as down."""
    if service and not live_workers(redis_db, settings, service)[0]:
        raise GatewayError(205, f'no live worker runs service {service.name!r}: its jobs wait')
    counts, since = invocations(redis_db)
    total = counts.get(service.name, 0) if service else sum(counts.get(name, 0) for name in settings.services)
    return {'invocations': total, 'lastReset': since}


def canarie_answers():
    """The answers of a CANARIE page; one set to "text,status" answers that status with that text."""
    answers = {
        **errors(404, 500, 503),
        '200': {'description': 'info and stats: JSON when asked for, else HTML; the others: a page or a text',
                'content': {'application/json': {'schema': {'anyOf': [{'$ref': '#/components/schemas/Info'},
                                                                       {'$ref': '#/components/schemas/Stats'}]}},
                            **HTML, **TEXT}},
        '204': {'description': 'the page is not set'},
        '302': {'description': 'the page is elsewhere (Location), to an HTTP/1.0 client'},
        '303': {'description': 'the page is elsewhere (Location)'}}
    for status in {page.status for _, pages in PAGE_SECTIONS for page in pages.values() if page.kind == 'text'}:
        answer = answers.setdefault(str(status), {'description': f'a page set to "text,{status}"'})
        answer['content'] = {**answer.get('content', {}), **TEXT}
    return answers


CANARIE_ANSWERS = canarie_answers()


@app.get(f'/{CANARIE_PAGE}')
@described('CANARIE API of the gateway', CANARIE_ANSWERS)
def platform_page(page):
    return canarie_page(None, page)


@app.get(f'/<service_name>/{CANARIE_PAGE}')
@app.get(f'/<service_name>/service/{CANARIE_PAGE}')
@described('CANARIE API of a service', CANARIE_ANSWERS)
def service_page(service_name, page):
    return canarie_page(service_named(service_name), page)


# Monitoring -------------------------------------------------------------------------------

# The state label: RQ's names for its queue and registries; the figure field it is read from.
COUNTED_STATES = {'queued': 'queued', 'started': 'running', 'failed': 'failed', 'finished': 'finished'}


class GatewayCollector:
    """Prometheus collector: per service, RQ's counts, live and busy workers, submissions, job
    durations and the workers it needs, read at scrape time."""

    def collect(self):
        figures = read_figures(redis_db, settings)
        submitted, _ = invocations(redis_db)
        loads = {name: load_of(settings.services[name], figure) for name, figure in figures.items()}
        jobs = GaugeMetricFamily('gateway_jobs', 'Jobs per service and state, as RQ counts them',
                                 labels=['service', 'state'])
        workers = GaugeMetricFamily('gateway_workers', 'Live workers per service', labels=['service'])
        busy = GaugeMetricFamily('gateway_workers_busy', 'Live workers running a job', labels=['service'])
        submissions = CounterMetricFamily('gateway_submissions', 'Submissions since lastReset', labels=['service'])
        durations = HistogramMetricFamily('gateway_job_duration_seconds', 'How long finished and failed jobs ran',
                                          labels=['service'])
        needed = GaugeMetricFamily('gateway_workers_needed', 'Workers each service needs (capacity.py)',
                                   labels=['service'])
        for name, count in plan(loads, settings.max_workers_total).items():
            figure = figures[name]
            for state, field in COUNTED_STATES.items():
                jobs.add_metric([name, state], getattr(figure, field))
            workers.add_metric([name], figure.workers)
            busy.add_metric([name], figure.busy)
            submissions.add_metric([name], submitted.get(name, 0))
            durations.add_metric([name], figure.records.duration_buckets, figure.records.duration_sum)
            needed.add_metric([name], count)
        yield from (jobs, workers, busy, submissions, durations, needed)


metrics_registry = CollectorRegistry()
metrics_registry.register(GatewayCollector())


@app.get('/')
@described('Home page: the services, their figures and their CANARIE pages', {
    '200': {'description': 'HTML', 'content': HTML}, **errors(500, 503)})
def home():
    return bottle.template('home', platform=settings.info, services=settings.services,
                           figures=read_figures(redis_db, settings), invocations=invocations(redis_db)[0],
                           pages=CANARIE_PAGES, now=utc_text(datetime.now(timezone.utc)), base=request.script_name)


@app.get('/metrics')
@described('Prometheus metrics', {'200': {'description': 'Prometheus text format', 'content': {
    **TEXT}}, **errors(500, 503)})
def metrics():
    response.content_type = CONTENT_TYPE_LATEST
    return generate_latest(metrics_registry)


@app.get('/openapi.json')
@described('This description', {'200': {'description': 'OpenAPI 3.1', 'content': {
    'application/json': {'schema': {'type': 'object'}}}}})
def openapi():
    response.content_type = 'application/json'
    return OPENAPI


# Assembled once all routes exist, so that a route without a description stops start-up.
OPENAPI = json.dumps(openapi_document())


# Main -------------------------------------------------------------------------------------

def serve():
    """Serve the gateway with waitress (``python app.py`` with a Redis URL)."""
    import waitress

    with exit_on_settings_error():
        require_jwt_secret(settings)
    proxy = dict(trusted_proxy=settings.trusted_proxy, trusted_proxy_headers=(
        'x-forwarded-for x-forwarded-host x-forwarded-proto x-forwarded-port')) if settings.trusted_proxy else {}
    waitress.serve(app, host=os.environ.get('HOST', '127.0.0.1'), port=settings.port, url_prefix=settings.url_prefix,
                   max_request_body_size=max(10 * 2**20, 2 * settings.max_content_length), **proxy)


def run_embedded():
    """Run everything on this machine until Ctrl-C: an in-memory Redis (fakeredis), one
    worker per service and the gateway, the same processes as the Procfile's. Unless the
    settings name a storage, a loopback one serves ``samples/`` as stored documents and
    keeps posted annotations in memory."""
    from fakeredis import TcpFakeServer

    redis_server = TcpFakeServer(('127.0.0.1', 0))
    redis_server.daemon_threads = True  # a client blocked in BLPOP must not hold up Ctrl-C
    threading.Thread(target=redis_server.serve_forever, daemon=True).start()
    storage = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(EmbeddedStorage, directory=HERE / 'samples'))
    threading.Thread(target=storage.serve_forever, daemon=True).start()
    storage_base = 'http://{}:{}'.format(*storage.server_address)
    secret = settings.jwt_secret or secrets.token_urlsafe(48)
    redis_url = 'redis://{}:{}/0'.format(*redis_server.server_address)
    workdir = tempfile.mkdtemp(prefix='gateway-embedded-')
    env = dict(os.environ, REDIS_URL=redis_url, GATEWAY_JWT_SECRET=secret, GATEWAY_EMBEDDED_REDIS='1',
               GATEWAY_SETTINGS=str(embedded_settings(workdir, storage_base)))
    base = f'http://127.0.0.1:{settings.port}'
    # Said before the children start, so that it is the first line whatever they log.
    print(f'Embedded mode: in-memory Redis (fakeredis) at {redis_url}, {len(settings.services)} worker(s) '
          f'({", ".join(settings.services)}), gateway on {base}; Ctrl-C stops everything.', flush=True)
    children = [subprocess.Popen([sys.executable, str(HERE / 'app.py')], env=env)]
    children += [subprocess.Popen([sys.executable, str(HERE / 'worker.py'), name], env=env)
                 for name in settings.services]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with redis.Redis.from_url(redis_url) as connection:
            wait_for_children(children, lambda: listening(settings.port) and workers_listen(
                connection, len(settings.services)))
        service = next(iter(settings.services))
        print(f'\nTry it (the token is valid for {settings.jwt_ttl} s):\n\n'
              f'  curl {base}/{service}/annotate --data-urlencode doc_url={storage_base}/hello.wav '
              f'--header "Authorization: Bearer {make_token(secret, settings.jwt_ttl)}"\n'
              f'  curl "{base}/{service}/status?uuid=<the uuid it answered>"\n', flush=True)
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        sys.exit('a process of the embedded gateway stopped; see its messages above')
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        storage.shutdown()
        redis_server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def embedded_settings(directory, storage_base):
    """A copy of the settings for the embedded processes, with the loopback storage
    wherever the settings name none."""
    parser = configparser.ConfigParser(interpolation=None, default_section='no default section')
    parser.read(settings.path, encoding='utf-8')
    if not parser.has_section('storage'):
        parser.add_section('storage')
    loopback = {'get_storage_doc_url': f'{storage_base}/{{storage_doc_id}}',
                'post_annotations_url': f'{storage_base}/document/{{ann_doc_id}}/annotations'}
    for key, value in loopback.items():
        if not parser.get('storage', key, fallback='').strip():
            parser.set('storage', key, value)
    # Page files are named relative to the settings file, which this copy is not beside.
    for section, pages in PAGE_SECTIONS:
        for key, page in pages.items():
            if page.kind == 'file' and parser.has_option(section, key):
                parser.set(section, key, page.value)
    path = Path(directory, 'settings.ini')
    with open(path, 'w', encoding='utf-8') as file:
        parser.write(file)
    return path


class EmbeddedStorage(SimpleHTTPRequestHandler):
    """The loopback storage of the embedded mode: ``GET /<id>`` serves ``samples/<id>``;
    ``POST /document/<id>/annotations`` keeps the annotations, which ``GET`` then returns."""

    annotations = {}

    def do_GET(self):
        if self.path in self.annotations:
            return self.reply(200, self.annotations[self.path])
        return super().do_GET()

    def do_POST(self):
        if not re.fullmatch(r'/document/[^/]+/annotations', self.path):
            return self.reply(404, b'{}')
        self.annotations[self.path] = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        return self.reply(200, b'{}')

    def reply(self, status, body):
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def wait_for_children(children, ready, timeout=60):
    """Wait until ``ready()``; stop if a child process ends or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if any(child.poll() is not None for child in children) or time.monotonic() > deadline:
            sys.exit('the embedded gateway did not start; see the messages above')
        time.sleep(0.1)


def listening(port):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=0.5).close()
        return True
    except OSError:
        return False


def workers_listen(connection, count):
    """Whether ``count`` workers are registered and waiting for jobs: the curl command then
    comes after what they log as they start."""
    workers = Worker.all(connection=connection)
    return len(workers) >= count and all(worker.state == 'idle' for worker in workers)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='app.py', description='The Service Gateway. Without REDIS_URL it runs '
                                     'everything on an embedded in-memory Redis.')
    commands = parser.add_subparsers(dest='command')
    token = commands.add_parser('token', help='print a valid JWT (needs GATEWAY_JWT_SECRET)')
    token.add_argument('--ttl', type=int, default=settings.jwt_ttl, help='lifetime in seconds')
    args = parser.parse_args(argv)
    if args.command == 'token':
        with exit_on_settings_error():
            require_jwt_secret(settings, bypass_allowed=False)
        print(make_token(settings.jwt_secret, args.ttl))
    elif settings.redis_url:
        serve()
    else:
        run_embedded()


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s %(message)s')
    main()
