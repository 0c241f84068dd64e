"""What the gateway and its workers keep in Redis beside RQ's own records.

- which service issued each uuid (so that an expired job reads EXPIRED, not 404);
- submissions: a total per service since ``lastReset`` (CANARIE stats, /metrics), and
  counts per minute for the recent arrival rate (capacity.py);
- durations of finished jobs: the most recent ones per service (mean and p90 for
  capacity.py), and histogram buckets (/metrics).

Each is a handful of O(1) commands on submission or job end, so that reading them
never scans RQ's registries.
"""

import time
from datetime import datetime, timezone

INVOCATIONS = 'gateway:invocations'     # hash: service -> submissions since LAST_RESET
LAST_RESET = 'gateway:invocations:since'
ARRIVAL_MINUTES_KEPT = 120
RECENT_DURATIONS_KEPT = 1000
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)  # seconds, Prometheus 'le'


def utc_text(moment):
    return moment.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def uuid_key(uuid):
    """Which service issued ``uuid``. It outlives the job, so that the gateway can tell an
    expired job (EXPIRED) from a uuid it never issued (404)."""
    return f'gateway:uuid:{uuid}'


def _arrivals_key(service, minute):
    return f'gateway:arrivals:{service}:{minute}'


def record_submission(pipe, service, now=None):
    """Count a submission, in the transaction that queues it."""
    now = now or time.time()
    pipe.hincrby(INVOCATIONS, service, 1)
    pipe.set(LAST_RESET, utc_text(datetime.fromtimestamp(now, timezone.utc)), nx=True)
    minute = _arrivals_key(service, int(now // 60))
    pipe.incr(minute)
    pipe.expire(minute, ARRIVAL_MINUTES_KEPT * 60)


def invocations(connection):
    """Submissions per service since ``lastReset``, and lastReset: when counting began (the
    first submission or the first reading, whichever came first)."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.set(LAST_RESET, utc_text(datetime.now(timezone.utc)), nx=True)
        pipe.hgetall(INVOCATIONS)
        pipe.get(LAST_RESET)
        _, counts, since = pipe.execute()
    return {name.decode(): int(count) for name, count in counts.items()}, since.decode()


def arrival_rate(connection, service, window_minutes=5, now=None):
    """Submissions per second over the last ``window_minutes`` whole minutes and the current
    one so far; None when there was none."""
    now = now or time.time()
    minute = int(now // 60)
    counts = connection.mget([_arrivals_key(service, m) for m in range(minute - window_minutes, minute + 1)])
    if all(count is None for count in counts):
        return None
    return sum(int(count or 0) for count in counts) / (window_minutes * 60 + now - minute * 60)


def _durations_key(service):
    return f'gateway:durations:{service}'


def _buckets_key(service):
    return f'gateway:duration_buckets:{service}'


def record_duration(pipe, service, seconds):
    """Record how long a job ran (in its worker, when it ends)."""
    pipe.lpush(_durations_key(service), round(seconds, 3))
    pipe.ltrim(_durations_key(service), 0, RECENT_DURATIONS_KEPT - 1)
    bucket = next((str(le) for le in DURATION_BUCKETS if seconds <= le), '+Inf')
    pipe.hincrby(_buckets_key(service), bucket, 1)
    pipe.hincrbyfloat(_buckets_key(service), 'sum', seconds)


def recent_durations(connection, service, count=RECENT_DURATIONS_KEPT):
    """Durations in seconds of the service's ``count`` most recent jobs, newest first."""
    return [float(value) for value in connection.lrange(_durations_key(service), 0, count - 1)]


def duration_histogram(connection, service):
    """``([(le, cumulative count)...], sum)`` of every recorded duration, for Prometheus."""
    counts = {key.decode(): value for key, value in connection.hgetall(_buckets_key(service)).items()}
    cumulative, buckets = 0, []
    for le in (*map(str, DURATION_BUCKETS), '+Inf'):
        cumulative += int(counts.get(le, 0))
        buckets.append((le, cumulative))
    return buckets, float(counts.get('sum', 0))
