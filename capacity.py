"""How many workers each service needs: the capacity estimate of the gateway.

    python capacity.py [--json | --heroku] [--watch SECONDS] [--exec 'CMD']

The core here is pure arithmetic on a ``ServiceLoad``, a snapshot of what Redis
and RQ say about one service, so that it can be tested by hand and replayed in
a simulation (``bench/capacity_sim.py``) without a Redis server:

- ``needed_workers`` says how many workers one service needs now;
- ``share_total`` divides a shared ``max_workers_total`` between services when
  their needs add up to more.

Below it, ``read_figures`` reads what Redis says of each service, ``load_of``
makes the snapshots of it, and ``main`` prints them (the gateway's /metrics and
home page read the same figures); ``live_workers`` reads only one service's
live and busy workers, for the gateway's pages that need no more.
"""

import argparse
import dataclasses
import json
import logging
import math
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from rq import Queue
from rq.job import Job
from rq.utils import utcparse
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from records import (
    ANSWERS_PER_SERVICE,
    ARRIVAL_WINDOW,
    ARRIVAL_WINDOW_MINUTES,
    ServiceRecords,
    ask_service_records,
    service_records,
)
from settings import exit_on_settings_error, gateway_redis, load_settings, require_redis_url

log = logging.getLogger('capacity')

# Float arithmetic such as 0.07 * 90 / 0.7 lands a hair above a whole number;
# without this slack math.ceil would ask for one worker too many.
CEIL_SLACK = 1e-9

# When the wait of the job at the head of the queue is not known (``oldest_wait``
# None), or a new worker would not start within the target wait, the head is
# taken to have waited this share of the target: the busy workers are then
# trusted with the queue for the rest, half the target. A compromise found in the
# simulation before the head's wait was read: a quarter cost 1-5 % more
# worker-hours in six of its seven scenarios, three quarters brought p95 waits
# to 0.9-1.0 of the target for at most 2 % fewer.
ASSUMED_SHARE_WAITED = 0.5

# Jobs that fail at once are recorded as lasting 0 s; the formula divides by the duration.
SHORTEST_DURATION = 0.001


@dataclass(frozen=True)
class ServiceLoad:
    """What capacity.py knows of one service at one moment."""

    name: str
    queued: int              # jobs waiting in the queue
    running: int             # jobs being run
    workers: int             # live workers listening on the queue
    busy: int                # of which busy
    arrival_rate: float | None   # submissions per second over the recent window; None = no data
    mean_duration: float | None  # seconds, over recent finished jobs; None = no history
    p90_duration: float | None
    min_workers: int
    max_workers: int
    target_wait: float       # seconds a job should wait at most before it starts
    expected_duration: float  # seconds, used when there is no duration history
    target_utilisation: float = 0.7
    start_delay: float = 0.0  # seconds from asking for a worker to its first job; 0 = at once
    oldest_wait: float | None = None  # seconds the job at the head of the queue has waited; None = unknown
    arrival_window: float = ARRIVAL_WINDOW  # seconds arrival_rate is measured over


def needed_workers(load: ServiceLoad) -> int:
    """The number of workers ``load``'s service needs now: the larger of two terms.

    With ``D`` the mean job duration (``expected_duration`` while there is no
    history), ``rate`` the arrival rate (0 when unknown) over the last ``W``
    seconds (``arrival_window``), ``Q`` the queued jobs, ``A`` how long the
    job at the head of the queue has waited (``oldest_wait``), ``T`` the
    target wait, ``R`` the start delay (a worker's boot plus the period of
    the scaler that asks for it) and ``u`` the target utilisation:

    Steady state, ``present + rate * D * (1 / u - 1)``. ``rate * D`` is the
    arriving work counted in busy workers (Little's law), and ``rate * D / u``
    keeps utilisation under ``u``; this term is exactly that, except that
    ``present = min(max(0, rate - Q / W) * D, busy + Q + rate * max(0, R - T))``
    replaces the first ``rate * D``:

    - ``rate - Q / W``: the queued jobs arrived within the window (unless
      they waited longer than it) and count in the rate, but keep no worker
      busy yet; they are the backlog term's, which gives them their target
      wait, where counting them here would give each a worker at once. A
      burst, a batch of jobs submitted together, is thus sized by the
      backlog term and not held as a rate for the whole window. Only when
      a new worker starts in time (``R < T``, below); otherwise ``rate``.
    - ``busy + Q + rate * max(0, R - T)``: each job keeps at most one worker
      busy, so the jobs in hand bound the work there is, counting as in
      hand those that arrive within ``R - T``: they must find a worker that
      is already there, since one asked for now would start them too late.
      A rate measured over a window still counts a burst whose jobs are
      done; the bound stops it from holding workers idle.

    The reserve ``rate * D * (1 / u - 1)`` is for arrivals that come before
    a new worker is up: ``u`` near 1 suits workers that start well within
    ``T``, lower values slow-starting ones.

    Backlog, ``busy + max(0, Q - busy * max(0, T - A) / D) / (1 + max(0, T - R) / D)``.
    The job at the head of the queue must start within ``T - A``; the busy
    workers free up one every ``D / busy`` seconds and take the queue in
    order, so they alone start ``busy * (T - A) / D`` queued jobs within
    that time. When ``A`` is unknown, or a new worker does not start in
    time (below), it is taken as ``T / 2`` (``ASSUMED_SHARE_WAITED``). Each
    job beyond those needs a new worker. These are the later arrivals,
    which have up to the whole ``T`` left, and a new worker starts its
    first job after ``R`` and then one every ``D``: ``1 + (T - R) / D``
    jobs within the target, or at least its first one when ``R`` exceeds
    ``T``.

    A new worker starts in time when ``R < T``. Both readings of the queue
    above, ``Q / W`` out of the rate and ``A`` for the head's wait, ask for
    fewer workers on the strength of what the queue shows now; if the
    busy workers fall behind, the next evaluation must be able to make up
    for it with a worker that still starts within the target. When ``R >=
    T`` it cannot, so the estimate keeps the cautious reading: every
    arrival counts in the rate, and the head is taken to have waited
    ``T / 2``.

    The result is rounded up, then held within ``min_workers`` and
    ``max_workers``, and never below ``busy``: fewer would tell the operator
    to stop workers that are running jobs.

    ``p90_duration`` is deliberately unused: the work a queue brings is its
    mean duration times its rate whatever the spread, and the p90/mean ratio
    barely tells a long tail from an exponential one (2.2 for a lognormal of
    sigma 1.5, 2.3 for an exponential), so it cannot size a safety margin.
    """
    duration = load.expected_duration if load.mean_duration is None else load.mean_duration
    duration = max(duration, SHORTEST_DURATION)
    rate = load.arrival_rate or 0.0
    in_time = load.start_delay < load.target_wait
    started_rate = max(0.0, rate - load.queued / load.arrival_window) if in_time else rate
    in_hand = load.busy + load.queued + rate * max(0.0, load.start_delay - load.target_wait)
    present = min(started_rate * duration, in_hand)
    steady = present + rate * duration * (1 / load.target_utilisation - 1)

    waited = (load.oldest_wait if in_time and load.oldest_wait is not None
              else load.target_wait * ASSUMED_SHARE_WAITED)
    left_to_busy = load.busy * max(0.0, load.target_wait - waited) / duration
    starts_per_new_worker = 1 + max(0.0, load.target_wait - load.start_delay) / duration
    backlog = load.busy + max(0.0, load.queued - left_to_busy) / starts_per_new_worker

    need = math.ceil(max(steady, backlog) - CEIL_SLACK)
    need = min(max(need, load.min_workers), load.max_workers)
    return max(need, load.busy)


def share_total(needs: dict[str, int], loads: dict[str, ServiceLoad],
                max_workers_total: int) -> dict[str, int]:
    """Divide ``max_workers_total`` between services by need, minimums first.

    Each service's need is first held within its floor (below) and its
    ``max_workers``; when these fit within the total, each service gets
    its need. Otherwise:

    1. every service gets its floor: ``min_workers``, and at least its ``busy``
       workers. Busy workers hold their slot until their job ends whatever
       is decided (a scale-down lets them finish), so handing their slot to
       another service would promise capacity that is not free;
    2. what is left of the total is divided in proportion to each service's
       need above its floor. Whole workers are given by the largest-remainder
       method: each gets the whole part of its share, then the workers left
       over go one each to the largest fractional parts (ties: the larger
       unmet need, then the name, so the result is deterministic). No share
       exceeds a service's need, since the needs above the floors add up to
       more than what is left.

    When the floors alone exceed the total, the floors are returned anyway:
    a minimum is the operator's promise of availability and busy workers
    cannot be taken back, so the total is overrun rather than either being
    broken; a warning is logged, and the caller sees it in the sum.
    """
    floors = {name: max(loads[name].min_workers, loads[name].busy) for name in needs}
    wanted = {name: max(min(need, loads[name].max_workers), floors[name])
              for name, need in needs.items()}
    if sum(wanted.values()) <= max_workers_total:
        return wanted
    if sum(floors.values()) >= max_workers_total:
        if sum(floors.values()) > max_workers_total:
            log.warning('minimum and busy workers (%d) exceed max_workers_total (%d): keeping them',
                        sum(floors.values()), max_workers_total)
        return floors

    left = max_workers_total - sum(floors.values())
    above_floor = {name: wanted[name] - floors[name] for name in needs}
    total_above = sum(above_floor.values())
    shares = {name: left * above_floor[name] / total_above for name in needs}
    given = {name: floors[name] + math.floor(shares[name]) for name in needs}
    leftover = max_workers_total - sum(given.values())
    by_remainder = sorted(needs, key=lambda name: (-(shares[name] - math.floor(shares[name])),
                                                   -above_floor[name], name))
    for name in by_remainder[:leftover]:
        given[name] += 1
    return given


# Reading Redis ------------------------------------------------------------------------------
# What follows feeds the core above from RQ's records and the gateway's (records.py), in two
# round trips for any number of services, and never a scan of RQ's registries.

HEAD_JOBS = 3  # jobs read at the head of a queue for its oldest wait: a callback may sit first


@dataclass(frozen=True)
class ServiceFigures:
    """What Redis says of one service at one moment."""

    queued: int
    running: int          # RQ's started registry, less expired entries (as RQ's own count)
    failed: int
    finished: int
    workers: int          # live: last heartbeat under worker_ttl old
    busy: int
    oldest_wait: float | None  # seconds the oldest of the jobs at the head of the queue has waited
    records: ServiceRecords

    @property
    def mean_duration(self):
        """The records' mean duration, for the gateway's ETA, which reads it here."""
        return self.records.mean_duration


def _ask_queue(pipe, queue, now):
    """Add the reads of a queue's figures to ``pipe``, ``QUEUE_ANSWERS`` of them: its length, the
    live entries of its started, failed and finished registries, the keys of the workers that
    listen on it and the ids of its first ``HEAD_JOBS`` jobs. ``read_figures`` reads the answers."""
    pipe.llen(queue.key)
    for registry in (queue.started_job_registry, queue.failed_job_registry, queue.finished_job_registry):
        pipe.zcount(registry.key, now, '+inf')  # entries scored before now have expired
    pipe.smembers(WORKERS_BY_QUEUE_KEY % queue.name)
    pipe.lrange(queue.key, 0, HEAD_JOBS - 1)


QUEUE_ANSWERS = 6  # per service, before the ANSWERS_PER_SERVICE of its records


def _live_and_busy(beats_and_states, now, worker_ttl):
    """How many workers are live, of RQ's (last_heartbeat, state) of each, and how many of those
    are busy. Live means a last heartbeat under ``worker_ttl`` seconds before ``now``: a worker
    that died without unregistering stays in RQ's sets until its key expires."""
    oldest_beat = now - worker_ttl
    live = [state for heartbeat, state in beats_and_states
            if heartbeat and utcparse(heartbeat.decode()).timestamp() > oldest_beat]
    return len(live), live.count(b'busy')


def live_workers(connection, settings, service):
    """The live workers of ``service`` and how many of them are busy, in two round trips:
    for the pages that need only these, where ``read_figures`` would read every figure."""
    now = time.time()
    keys = connection.smembers(WORKERS_BY_QUEUE_KEY % service.queue)
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, 'last_heartbeat', 'state')
        beats_and_states = pipe.execute()
    return _live_and_busy(beats_and_states, now, settings.worker_ttl)


def read_figures(connection, settings, services=None):
    """``ServiceFigures`` per service (every configured one unless ``services`` are given)."""
    services = list(services or settings.services.values())
    now = time.time()
    with connection.pipeline(transaction=False) as pipe:
        for service in services:
            _ask_queue(pipe, Queue(service.queue, connection=connection), now)
            ask_service_records(pipe, service.name, now)
        answers = pipe.execute()
    per_service = QUEUE_ANSWERS + ANSWERS_PER_SERVICE
    read = [answers[number * per_service:(number + 1) * per_service] for number in range(len(services))]
    worker_keys = sorted({key for answer in read for key in answer[4]})
    head_ids = sorted({job_id.decode() for answer in read for job_id in answer[5]})
    with connection.pipeline(transaction=False) as pipe:
        for key in worker_keys:
            pipe.hmget(key, 'last_heartbeat', 'state')
        for job_id in head_ids:
            pipe.hget(Job.key_for(job_id), 'enqueued_at')
        second = pipe.execute()
    heartbeats = dict(zip(worker_keys, second[:len(worker_keys)], strict=True))
    enqueued = dict(zip(head_ids, second[len(worker_keys):], strict=True))
    figures = {}
    for service, (queued, running, failed, finished, keys, heads, *records) in zip(services, read, strict=True):
        workers, busy = _live_and_busy((heartbeats[key] for key in keys), now, settings.worker_ttl)
        stamps = [enqueued[job_id.decode()] for job_id in heads if enqueued[job_id.decode()]]
        oldest_wait = max((now - utcparse(stamp.decode()).timestamp() for stamp in stamps), default=None)
        figures[service.name] = ServiceFigures(
            queued=queued, running=running, failed=failed, finished=finished, workers=workers, busy=busy,
            oldest_wait=oldest_wait, records=service_records(records, now))
    return figures


def load_of(service, figures, start_delay_extra=0.0):
    """The ``ServiceLoad`` of a service's figures and settings.

    ``start_delay_extra`` is added to the service's ``start_delay``: the period of a scaler
    that acts on these figures (``--watch``), during which a need waits unseen.
    """
    return ServiceLoad(
        name=service.name, queued=figures.queued, running=figures.running, workers=figures.workers,
        busy=figures.busy, arrival_rate=figures.records.arrival_rate, mean_duration=figures.records.mean_duration,
        p90_duration=figures.records.p90_duration,
        min_workers=service.min_workers, max_workers=service.max_workers, target_wait=service.target_wait,
        expected_duration=service.expected_duration, target_utilisation=service.target_utilisation,
        start_delay=service.start_delay + start_delay_extra, oldest_wait=figures.oldest_wait,
        arrival_window=figures.records.arrival_window)


def plan(loads, max_workers_total):
    """The workers each service needs, shared within ``max_workers_total`` (0: no shared limit)."""
    needs = {name: needed_workers(load) for name, load in loads.items()}
    return share_total(needs, loads, max_workers_total) if max_workers_total else needs


def notes(load, need):
    """What an operator should know about an estimate: missing data, and SPEC codes 400/401."""
    said = []
    if load.mean_duration is None:
        said.append(f'no duration history yet: assuming expected_duration {load.expected_duration:g} s')
    if load.arrival_rate is None:
        said.append(f'no submissions in the last {ARRIVAL_WINDOW_MINUTES} minutes')
    unbounded = needed_workers(dataclasses.replace(load, min_workers=0, max_workers=10**9))
    if need < unbounded:
        said.append(f'code 400: not enough resources to add a worker (would need {unbounded})')
    if unbounded < load.min_workers:
        said.append(f'code 401: minimum number of workers reached (would need {unbounded})')
    return said


# The command -----------------------------------------------------------------------------

def report(loads, needs):
    """The figures and needs of every service, as ``--json`` prints them."""
    return [{'service': name, 'queued': load.queued, 'running': load.running, 'workers': load.workers,
             'busy': load.busy,
             'rate_per_minute': None if load.arrival_rate is None else round(load.arrival_rate * 60, 2),
             'mean_seconds': None if load.mean_duration is None else round(load.mean_duration, 1),
             'p90_seconds': None if load.p90_duration is None else round(load.p90_duration, 1),
             'needed': needs[name], 'delta': needs[name] - load.workers, 'notes': notes(load, needs[name])}
            for name, load in loads.items()]


def table(rows):
    header = ('service', 'queued', 'running', 'workers', 'busy', 'rate/min', 'mean s', 'needed', 'delta')
    keys = ('service', 'queued', 'running', 'workers', 'busy', 'rate_per_minute', 'mean_seconds', 'needed', 'delta')
    cells = [header] + [tuple('-' if row[key] is None else f'{row[key]:+d}' if key == 'delta' else str(row[key])
                              for key in keys) for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    lines = ['  '.join(cell.ljust(width) if column == 0 else cell.rjust(width)
                       for column, (cell, width) in enumerate(zip(line, widths, strict=True))) for line in cells]
    lines += [f'{row["service"]}: {note}' for row in rows for note in row['notes']]
    return '\n'.join(lines)


def procfile_processes(path):
    """The services of each Procfile process that runs ``python worker.py SERVICE...``."""
    processes = {}
    for line in Path(path).read_text().splitlines():
        name, _, command = line.partition(':')
        words = command.split()
        scripts = [index for index, word in enumerate(words) if word.endswith('worker.py')]
        if scripts:
            processes[name.strip()] = words[scripts[0] + 1:]
    return processes


def heroku_lines(rows, processes):
    """``heroku ps:scale`` for each Procfile worker process: the needs of its services added up;
    a service no process runs is said, as a comment."""
    needed = {row['service']: row['needed'] for row in rows}
    run = {service for services in processes.values() for service in services}
    return [f'heroku ps:scale {process}={sum(needed.get(service, 0) for service in services)}'
            for process, services in processes.items()] + [
        f'# {service}: no Procfile process runs python worker.py {service}' for service in needed if service not in run]


def act(rows, command, acted, timeout=60):
    """Run ``command`` for each service whose need changed since the last time it was acted on
    (the first time: whose need differs from its live workers); a failure is reported, and
    tried again at the next evaluation."""
    for row in rows:
        if acted.get(row['service'], row['workers']) == row['needed']:
            continue
        words = [word.replace('{service}', row['service']).replace('{workers}', str(row['needed']))
                 .replace('{delta}', str(row['delta'])) for word in shlex.split(command)]
        try:
            failed = subprocess.run(words, check=False, timeout=timeout).returncode
        except (OSError, subprocess.TimeoutExpired) as error:
            failed = error
        if failed:
            print(f'capacity: {shlex.join(words)} failed: {failed}', file=sys.stderr)
        else:
            acted[row['service']] = row['needed']


def main(argv=None):
    parser = argparse.ArgumentParser(description='How many workers each service needs, from Redis and RQ.')
    output = parser.add_mutually_exclusive_group()
    output.add_argument('--json', action='store_true', help='print the figures as JSON')
    output.add_argument('--heroku', action='store_true', help='print heroku ps:scale lines (process names from '
                        'the Procfile)')
    parser.add_argument('--procfile', default=Path(__file__).with_name('Procfile'), help='for --heroku')
    parser.add_argument('--watch', type=float, metavar='SECONDS', help='evaluate again every SECONDS')
    parser.add_argument('--exec', metavar='CMD', dest='command',
                        help='run CMD for each service whose need changed; {service}, {workers} and {delta} '
                             'are replaced')
    args = parser.parse_args(argv)
    with exit_on_settings_error():
        settings = load_settings()
        require_redis_url(settings)
    connection = gateway_redis(settings)
    acted = {}
    while True:
        try:
            figures = read_figures(connection, settings)
            loads = {name: load_of(settings.services[name], figure, start_delay_extra=args.watch or 0.0)
                     for name, figure in figures.items()}
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if not args.watch:
                sys.exit(f'capacity: Redis is unavailable: {error}')
            print(f'capacity: Redis is unavailable, trying again in {args.watch:g} s: {error}', file=sys.stderr)
        else:
            rows = report(loads, plan(loads, settings.max_workers_total))
            if args.json:  # one line per evaluation when watching
                print(json.dumps(rows, indent=None if args.watch else 2))
            elif args.heroku:
                print('\n'.join(heroku_lines(rows, procfile_processes(args.procfile))))
            else:
                print(table(rows))
            if args.command:
                act(rows, args.command, acted)
        if not args.watch:
            return
        sys.stdout.flush()
        time.sleep(args.watch)


if __name__ == '__main__':
    main()
