"""What the gateway and its workers keep in Redis beside RQ's own records.

- which service issued each uuid (so that an expired job reads EXPIRED, not 404);
- submissions: a total per service since ``lastReset`` (CANARIE stats, /metrics), and
  counts per minute for the recent arrival rate (capacity.py);
- durations of finished jobs: the most recent ones per service (mean and p90 for
  capacity.py), and histogram buckets (/metrics).

Each is a handful of O(1) commands on submission or job end, so that reading them
never scans RQ's registries.
"""

import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

INVOCATIONS = 'gateway:invocations'     # hash: service -> submissions since LAST_RESET
LAST_RESET = 'gateway:invocations:since'
ARRIVAL_WINDOW_MINUTES = 5   # whole minutes the recent arrival rate is measured over, with the current one
ARRIVAL_WINDOW = ARRIVAL_WINDOW_MINUTES * 60  # seconds of those whole minutes
RECENT_DURATIONS_KEPT = 100  # finished jobs the mean and p90 durations are taken from
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
    pipe.expire(minute, (ARRIVAL_WINDOW_MINUTES + 2) * 60)


def invocations(connection):
    """Submissions per service since ``lastReset``, and lastReset: when counting began (the
    first submission or the first reading, whichever came first)."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(INVOCATIONS)
        pipe.set(LAST_RESET, utc_text(datetime.now(timezone.utc)), nx=True)  # the first reading starts it
        pipe.get(LAST_RESET)
        counts, _, since = pipe.execute()
    return {name.decode(): int(count) for name, count in counts.items()}, since.decode()


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


@dataclass(frozen=True)
class ServiceRecords:
    """A service's records as read at one moment."""

    arrival_rate: float | None  # submissions per second, recently; None when there was none
    arrival_window: float       # seconds the rate is measured over
    durations: list             # seconds, of the most recent jobs, newest first
    duration_buckets: list      # [(le, cumulative count)...], for a Prometheus histogram
    duration_sum: float

    @property
    def mean_duration(self):
        """Seconds, the mean of ``durations`` (what capacity.py sizes workers by); None with no history."""
        return statistics.fmean(self.durations) if self.durations else None

    @property
    def p90_duration(self):
        """Seconds, the 90th percentile of ``durations``, interpolated within the durations seen
        (for operators: capacity.py reports it but does not use it); None under two durations."""
        if len(self.durations) < 2:
            return None
        return statistics.quantiles(self.durations, n=10, method='inclusive')[-1]


def ask_service_records(pipe, service, now):
    """Add the reads of a service's records to ``pipe``; ``service_records`` reads the answers."""
    minute = int(now // 60)
    pipe.mget([_arrivals_key(service, m) for m in range(minute - ARRIVAL_WINDOW_MINUTES, minute + 1)])
    pipe.lrange(_durations_key(service), 0, RECENT_DURATIONS_KEPT - 1)
    pipe.hgetall(_buckets_key(service))


ANSWERS_PER_SERVICE = 3


def service_records(answers, now):
    """The ``ServiceRecords`` of the answers to ``ask_service_records``: the arrival rate is
    over the last whole minutes and the current one so far."""
    arrivals, durations, buckets = answers
    window = ARRIVAL_WINDOW + now % 60
    rate = None
    if any(count is not None for count in arrivals):
        rate = sum(int(count or 0) for count in arrivals) / window
    counts = {key.decode(): value for key, value in buckets.items()}
    cumulative, histogram = 0, []
    for le in (*map(str, DURATION_BUCKETS), '+Inf'):
        cumulative += int(counts.get(le, 0))
        histogram.append((le, cumulative))
    return ServiceRecords(rate, window, [float(value) for value in durations], histogram,
                          float(counts.get('sum', 0)))
