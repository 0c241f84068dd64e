"""Settings of the gateway and its services.

Read once from ``settings.ini`` (or the file named by ``GATEWAY_SETTINGS``),
with the environment overriding what a Heroku-style deployment sets there:
``REDIS_URL``, ``PORT`` and ``GATEWAY_JWT_SECRET``. The gateway, the workers
and the capacity script all read the same file, so that a worker on another
machine knows its services exactly as the gateway does.

A missing or malformed key raises ``SettingsError`` whose message names the
section and the key; the programs print it as one line and stop.
"""

import configparser
import dataclasses
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

DEFAULT_SETTINGS = Path(__file__).with_name('settings.ini')
SERVICE_NAME = re.compile(r'^[A-Za-z0-9_-]+$')
RELEASE_TIME = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ')  # CANARIE's UTC format
JWT_ALGORITHMS = {'HS256': 32, 'HS384': 48, 'HS512': 64}  # algorithm: minimum secret bytes (RFC 7518 3.2)
CANARIE_FIELDS = ('name', 'synopsis', 'version', 'institution', 'releaseTime',
                  'researchSubject', 'supportEmail', 'category', 'tags')
CANARIE_PAGES = ('doc', 'releasenotes', 'support', 'source', 'tryme', 'licence', 'provenance')


class SettingsError(Exception):
    """A setting is missing or malformed; the message names its section and key."""


def is_release_time(text):
    """Whether ``text`` is a real time in CANARIE's UTC format."""
    try:
        return bool(RELEASE_TIME.fullmatch(text)) and bool(datetime.strptime(text, '%Y-%m-%dT%H:%M:%SZ'))
    except ValueError:
        return False


@dataclass(frozen=True)
class Page:
    """A CANARIE page setting: a URL to redirect to, a file to render, or a text and status."""

    kind: str  # 'redirect', 'file' or 'text'
    value: str
    status: int = 200


@dataclass(frozen=True)
class ServiceSettings:
    """One ``[service:NAME]`` section: a route keyword, its queue and its worker's limits."""

    name: str
    function: str
    version: str
    queue: str
    timeout: int = 3600
    retries: int = 0
    retry_interval: int = 0
    noparams: bool = False
    max_document_size: int = 512 * 2**20
    download_timeout: int = 300
    min_workers: int = 0
    max_workers: int = 10
    target_wait: int = 300
    expected_duration: int = 60
    start_delay: int = 30
    target_utilisation: float = 0.7
    info: dict = field(default_factory=dict)
    pages: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """Everything the gateway, the workers and the capacity script are configured with."""

    path: Path
    redis_url: str | None
    port: int
    result_ttl: int
    uuid_ttl: int
    max_content_length: int
    redis_timeout: float
    worker_ttl: int
    max_workers_total: int
    trusted_proxy: str
    url_prefix: str
    jwt_secret: str | None
    jwt_audience: str
    jwt_algorithm: str
    jwt_ttl: int
    auth_bypass: bool
    get_storage_doc_url: str
    post_annotations_url: str
    storage_timeout: int
    storage_retries: int
    callback_retries: int
    services: dict
    info: dict = field(default_factory=dict)
    pages: dict = field(default_factory=dict)


class _Section:
    """Typed reads from one section that name the section and key when they fail."""

    def __init__(self, parser, name, known):
        self.name = name
        self.values = dict(parser[name]) if parser.has_section(name) else {}
        # configparser lower-cases keys; CANARIE's camelCase names are matched the same way.
        unknown = set(self.values) - {key.lower() for key in known}
        if unknown:
            raise SettingsError(f'[{name}] {sorted(unknown)[0]}: unknown key')

    def fail(self, key, problem):
        raise SettingsError(f'[{self.name}] {key}: {problem}')

    def text(self, key, default=None):
        value = self.values.get(key.lower(), '').strip()
        if value:
            return value
        if default is None:
            self.fail(key, 'is required')
        return default

    def integer(self, key, default, minimum=0):
        raw = self.text(key, str(default))
        try:
            value = int(raw)
        except ValueError:
            self.fail(key, f'{raw!r} is not an integer')
        if value < minimum:
            self.fail(key, f'must be at least {minimum}')
        return value

    def number(self, key, default):
        raw = self.text(key, str(default))
        try:
            value = float(raw)
        except ValueError:
            self.fail(key, f'{raw!r} is not a number')
        if value <= 0:
            self.fail(key, 'must be positive')
        return value

    def fraction(self, key, default):
        value = self.number(key, default)
        if value > 1:
            self.fail(key, 'must be at most 1')
        return value

    def boolean(self, key, default):
        raw = self.text(key, 'true' if default else 'false').lower()
        if raw not in configparser.ConfigParser.BOOLEAN_STATES:
            self.fail(key, f'{raw!r} is not a boolean (true/false)')
        return configparser.ConfigParser.BOOLEAN_STATES[raw]

    def template(self, key, placeholder):
        value = self.text(key, '')
        if value and '{%s}' % placeholder not in value:
            self.fail(key, f'must contain {{{placeholder}}}')
        return value

    def canarie(self, base, required):
        """The CANARIE info fields and pages of this section (page paths relative to ``base``);
        the info fields are ``required`` of the gateway, a service has the gateway's by default."""
        info = {key: self.text(key) for key in CANARIE_FIELDS if required or self.values.get(key.lower(), '').strip()}
        if 'releaseTime' in info and not is_release_time(info['releaseTime']):
            self.fail('releaseTime', f'{info["releaseTime"]!r} is not YYYY-MM-DDThh:mm:ssZ (UTC)')
        if 'tags' in info:
            info['tags'] = [tag.strip() for tag in info['tags'].split(',') if tag.strip()]
        return info, {key: self.page(key, base) for key in CANARIE_PAGES if self.values.get(key, '').strip()}

    def page(self, key, base):
        value = self.values[key].strip()
        if re.match(r'^https?://', value):
            return Page('redirect', value)
        text, _, status = value.rpartition(',')
        if re.fullmatch(r'\s*\d+\s*', status) and text:
            # A status that carries no text (1xx, 204, 304) could not answer with it.
            if not 200 <= int(status) <= 599 or int(status) in (204, 205, 304):
                self.fail(key, f'{value!r}: the status of a "text,status" page must be 200-599, '
                               f'and not 204, 205 or 304')
            return Page('text', text.strip(), int(status))
        path = Path(base, value)
        if not path.is_file():
            self.fail(key, f'{value!r} is no URL, no "text,status" and no file ({path} not found)')
        return Page('file', str(path.resolve()))


GATEWAY_KEYS = CANARIE_FIELDS + CANARIE_PAGES + (
    'redis_url', 'result_ttl', 'uuid_ttl', 'max_content_length', 'redis_timeout', 'worker_ttl', 'max_workers_total',
    'trusted_proxy', 'url_prefix', 'port')
SECURITY_KEYS = ('jwt_audience', 'jwt_algorithm', 'jwt_ttl', 'bypass')
STORAGE_KEYS = ('get_storage_doc_url', 'post_annotations_url', 'timeout', 'retries', 'callback_retries')
SERVICE_KEYS = CANARIE_FIELDS + CANARIE_PAGES + (
    'function', 'queue', 'timeout', 'retries', 'retry_interval', 'noparams', 'max_document_size',
    'download_timeout', 'min_workers', 'max_workers', 'target_wait', 'expected_duration', 'start_delay',
    'target_utilisation')


def load_settings(path=None, environ=os.environ):
    """Read and check the settings file; raise SettingsError naming the first bad key."""
    path = Path(path or environ.get('GATEWAY_SETTINGS') or DEFAULT_SETTINGS)
    parser = configparser.ConfigParser(interpolation=None, default_section='no default section')
    try:
        if not parser.read(path, encoding='utf-8'):
            raise SettingsError(f'{path}: file not found')
    except configparser.Error as error:
        raise SettingsError(f'{path}: {error}'.replace('\n', ' ')) from None

    gateway = _Section(parser, 'gateway', GATEWAY_KEYS)
    security = _Section(parser, 'security', SECURITY_KEYS)
    storage = _Section(parser, 'storage', STORAGE_KEYS)
    info, pages = gateway.canarie(path.parent, required=True)

    result_ttl = gateway.integer('result_ttl', 86400, minimum=1)
    uuid_ttl = gateway.integer('uuid_ttl', 7 * 86400, minimum=1)
    if uuid_ttl <= result_ttl:
        gateway.fail('uuid_ttl', f'must be longer than result_ttl ({result_ttl} s)')
    algorithm = security.text('jwt_algorithm', 'HS256').upper()
    if algorithm not in JWT_ALGORITHMS:
        security.fail('jwt_algorithm', f'{algorithm!r} is not one of {", ".join(JWT_ALGORITHMS)}')
    secret = environ.get('GATEWAY_JWT_SECRET') or None
    if secret and len(secret.encode()) < JWT_ALGORITHMS[algorithm]:
        raise SettingsError(f'GATEWAY_JWT_SECRET: {algorithm} needs a secret of at least '
                            f'{JWT_ALGORITHMS[algorithm]} bytes')
    port = environ.get('PORT') or gateway.text('port', '5000')
    if not port.isdigit():
        raise SettingsError(f'PORT: {port!r} is not a port number')

    services = {}
    for section in parser.sections():
        if section in ('gateway', 'security', 'storage'):
            continue
        kind, _, name = section.partition(':')
        if kind != 'service' or not SERVICE_NAME.match(name):
            raise SettingsError(f'[{section}]: unknown section (expected [service:NAME], NAME of letters, '
                                'digits, - and _)')
        services[name] = _service(_Section(parser, section, SERVICE_KEYS), name, info, pages, path.parent)
    if not services:
        raise SettingsError(f'{path}: no [service:NAME] section')
    max_workers_total = gateway.integer('max_workers_total', 0)
    if max_workers_total and sum(service.min_workers for service in services.values()) > max_workers_total:
        gateway.fail('max_workers_total', f'is less than the services\' min_workers added up '
                                          f'({sum(service.min_workers for service in services.values())})')

    return Settings(
        path=path,
        redis_url=environ.get('REDIS_URL') or gateway.text('redis_url', '') or None,
        port=int(port),
        result_ttl=result_ttl,
        uuid_ttl=uuid_ttl,
        max_content_length=gateway.integer('max_content_length', 2**20, minimum=1),
        redis_timeout=gateway.number('redis_timeout', 0.5),
        worker_ttl=gateway.integer('worker_ttl', 420, minimum=20),
        max_workers_total=max_workers_total,
        trusted_proxy=gateway.text('trusted_proxy', ''),
        url_prefix=gateway.text('url_prefix', ''),
        jwt_secret=secret,
        jwt_audience=security.text('jwt_audience', 'service-gateway'),
        jwt_algorithm=algorithm,
        jwt_ttl=security.integer('jwt_ttl', 3600, minimum=1),
        auth_bypass=security.boolean('bypass', False),
        get_storage_doc_url=storage.template('get_storage_doc_url', 'storage_doc_id'),
        post_annotations_url=storage.template('post_annotations_url', 'ann_doc_id'),
        storage_timeout=storage.integer('timeout', 10, minimum=1),
        storage_retries=storage.integer('retries', 3),
        callback_retries=storage.integer('callback_retries', 3),
        services=services,
        info=info,
        pages=pages,
    )


# The default of each service setting, as the dataclass declares it: written once, there.
SERVICE_DEFAULTS = {setting.name: setting.default for setting in dataclasses.fields(ServiceSettings)
                    if setting.default is not dataclasses.MISSING}


def _service(section, name, gateway_info, gateway_pages, base):
    """A service's settings; CANARIE fields and pages it does not set are the gateway's."""
    info, pages = section.canarie(base, required=False)

    def integer(key, minimum=0):
        """The integer setting ``key``, or its default."""
        return section.integer(key, SERVICE_DEFAULTS[key], minimum)

    min_workers = integer('min_workers')
    max_workers = integer('max_workers', minimum=1)
    if max_workers < min_workers:
        section.fail('max_workers', f'must be at least min_workers ({min_workers})')
    return ServiceSettings(
        name=name,
        function=section.text('function'),
        version=section.text('version'),
        queue=section.text('queue', name),
        timeout=integer('timeout', minimum=1),
        retries=integer('retries'),
        retry_interval=integer('retry_interval'),
        noparams=section.boolean('noparams', SERVICE_DEFAULTS['noparams']),
        max_document_size=integer('max_document_size', minimum=1),
        download_timeout=integer('download_timeout', minimum=1),
        min_workers=min_workers,
        max_workers=max_workers,
        target_wait=integer('target_wait', minimum=1),
        expected_duration=integer('expected_duration', minimum=1),
        start_delay=integer('start_delay'),
        target_utilisation=section.fraction('target_utilisation', SERVICE_DEFAULTS['target_utilisation']),
        info={**gateway_info, 'name': name, **info, 'version': section.text('version')},
        pages={**gateway_pages, **pages},
    )


@contextmanager
def exit_on_settings_error():
    """Stop the program with one line naming what is wrong, as SPEC section 3 asks."""
    try:
        yield
    except SettingsError as error:
        sys.exit(f'settings error: {error}')


def require_redis_url(settings):
    """Every process but `python app.py` (which can embed a Redis) needs a Redis URL."""
    if not settings.redis_url:
        raise SettingsError('REDIS_URL is not set')


def require_jwt_secret(settings, bypass_allowed=True):
    """A gateway needs a secret to check tokens (none ships), unless authentication is off."""
    if not settings.jwt_secret and not (bypass_allowed and settings.auth_bypass):
        raise SettingsError('GATEWAY_JWT_SECRET is not set' + (
            ' (or set [security] bypass = true on a closed development machine)' if bypass_allowed else ''))


def gateway_redis(settings):
    """A Redis client that fails fast: the gateway answers 503 rather than hang on a dead Redis.

    A broken pooled connection (Redis restarted) is retried once on a fresh one, so the
    gateway recovers by itself; a timeout is not retried, so a request waits at most
    ``redis_timeout`` on a Redis that does not answer.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,)),
    )


def worker_redis(settings):
    """A Redis client that rides out a Redis restart of up to about 30 seconds.

    RQ's worker retries a lost connection only while it waits for a job; one lost between
    two jobs ends the worker, so the client itself retries, with back-off (0.5, 1, 2, 4,
    then 5 s). Not longer: a worker asked to stop while Redis is gone waits that long.
    RQ sets the socket timeout to suit its blocking waits.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        retry=Retry(ExponentialBackoff(cap=5, base=0.25), retries=8, supported_errors=(redis.ConnectionError,)),
    )
