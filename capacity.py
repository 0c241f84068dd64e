"""How many workers each service needs: the capacity estimate of the gateway.

    python capacity.py [--json | --heroku] [--watch SECONDS] [--exec 'CMD']

The core here is pure arithmetic on a ``ServiceLoad``, a snapshot of what Redis
and RQ say about one service, so that it can be tested by hand and replayed in
a simulation (``bench/capacity_sim.py``) without a Redis server:

- ``needed_workers`` says how many workers one service needs now;
- ``share_total`` divides a shared ``max_workers_total`` between services when
  their needs add up to more.

Below it, ``read_loads`` fills the snapshots from Redis, and ``main`` prints
them (the gateway's /metrics publishes the same needs).
"""

import argparse
import dataclasses
import json
import logging
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import redis
from rq import Queue
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from records import arrival_rate, recent_durations
from settings import SettingsError, gateway_redis, load_settings

log = logging.getLogger('capacity')

# Float arithmetic such as 0.07 * 90 / 0.7 lands a hair above a whole number;
# without this slack math.ceil would ask for one worker too many.
CEIL_SLACK = 1e-9

# Share of the target wait during which the busy workers alone are trusted with
# the queue; the rest is margin for the time queued jobs have already waited,
# which the queue length does not tell. A compromise found in the simulation:
# a quarter cost 1-5 % more worker-hours in six of its seven scenarios, three
# quarters brought p95 waits to 0.9-1.0 of the target for at most 2 % fewer.
TRUSTED_SHARE_OF_WAIT = 0.5

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


def needed_workers(load: ServiceLoad) -> int:
    """The number of workers ``load``'s service needs now: the larger of two terms.

    With ``D`` the mean job duration (``expected_duration`` while there is no
    history), ``rate`` the arrival rate (0 when unknown), ``Q`` the queued
    jobs, ``T`` the target wait, ``R`` the start delay (a worker's boot plus
    the period of the scaler that asks for it) and ``u`` the target
    utilisation:

    Steady state, ``present + rate * D * (1 / u - 1)``. ``rate * D`` is the
    arriving work counted in busy workers (Little's law), and ``rate * D / u``
    keeps utilisation under ``u``; this term is exactly that, except that
    ``present = min(rate * D, busy + Q + rate * max(0, R - T))`` replaces
    the first ``rate * D``. Each job keeps at most one worker busy, so the
    jobs in hand bound the work there is, counting as in hand those that
    arrive within ``R - T``: they must find a worker that is already there,
    since one asked for now would start them too late. A rate measured over
    a window still counts a burst whose jobs are done; the bound stops it
    from holding workers idle. The reserve ``rate * D * (1 / u - 1)`` is for
    arrivals that come before a new worker is up: ``u`` near 1 suits workers
    that start well within ``T``, lower values slow-starting ones.

    Backlog, ``busy + max(0, Q - busy * T / (2 * D)) / (1 + max(0, T - R) / D)``.
    The busy workers free up one every ``D / busy`` seconds and take the
    queue in order, so they alone start ``busy * T / D`` queued jobs within
    ``T``; only half of that is trusted (``TRUSTED_SHARE_OF_WAIT``), since
    queued jobs have already waited for an unknown time. Each job beyond
    that needs a new worker, and a new worker starts its first job after
    ``R`` and then one every ``D``: ``1 + (T - R) / D`` jobs within the
    target, or at least its first one when ``R`` exceeds ``T``.

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
    arriving_work = rate * duration
    in_hand = load.busy + load.queued + rate * max(0.0, load.start_delay - load.target_wait)
    present = min(arriving_work, in_hand)
    steady = present + arriving_work * (1 / load.target_utilisation - 1)

    left_to_busy = load.busy * load.target_wait * TRUSTED_SHARE_OF_WAIT / duration
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
# What follows feeds the core above from RQ's records and the gateway's (records.py): O(1)
# reads per service, never a scan of RQ's registries.

ARRIVAL_WINDOW_MINUTES = 5   # submissions the arrival rate is measured over (as in the bench)
DURATION_HISTORY = 100       # finished jobs the mean and p90 durations are taken from
HEARTBEAT_FORMAT = '%Y-%m-%dT%H:%M:%S.%fZ'


def live_workers(connection, keys, worker_ttl):
    """How many of these RQ workers are live (last heartbeat under ``worker_ttl`` old), and busy."""
    with connection.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hmget(key, 'last_heartbeat', 'state')
        heartbeats = pipe.execute()
    oldest = datetime.now(timezone.utc) - timedelta(seconds=worker_ttl)
    live = [state for heartbeat, state in heartbeats
            if heartbeat and datetime.strptime(heartbeat.decode(), HEARTBEAT_FORMAT).replace(
                tzinfo=timezone.utc) > oldest]
    return len(live), sum(state == b'busy' for state in live)


def read_loads(connection, settings, services=None, start_delay_extra=0.0):
    """A ``ServiceLoad`` per service (every configured one unless ``services`` are given),
    read from Redis now.

    ``start_delay_extra`` is added to each service's ``start_delay``: the period of a
    scaler that acts on these figures (``--watch``), during which a need waits unseen.
    """
    loads = {}
    for service in services or settings.services.values():
        queue = Queue(service.queue, connection=connection)
        with connection.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            pipe.zcard(queue.started_job_registry.key)
            pipe.smembers(WORKERS_BY_QUEUE_KEY % queue.name)
            queued, running, worker_keys = pipe.execute()
        workers, busy = live_workers(connection, worker_keys, settings.worker_ttl)
        durations = recent_durations(connection, service.name, count=DURATION_HISTORY)
        loads[service.name] = ServiceLoad(
            name=service.name, queued=queued, running=running, workers=workers, busy=busy,
            arrival_rate=arrival_rate(connection, service.name, ARRIVAL_WINDOW_MINUTES),
            mean_duration=statistics.fmean(durations) if durations else None,
            p90_duration=statistics.quantiles(durations, n=10)[-1] if len(durations) > 1 else None,
            min_workers=service.min_workers, max_workers=service.max_workers, target_wait=service.target_wait,
            expected_duration=service.expected_duration, target_utilisation=service.target_utilisation,
            start_delay=service.start_delay + start_delay_extra)
    return loads


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
    capped = needed_workers(dataclasses.replace(load, max_workers=10**9))
    if need < capped:
        said.append(f'code 400: not enough resources to add a worker (would need {capped})')
    if need == load.min_workers and load.workers > need:
        said.append('code 401: minimum number of workers reached')
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
    """``heroku ps:scale`` for each Procfile worker process: the needs of its services added up."""
    needed = {row['service']: row['needed'] for row in rows}
    return [f'heroku ps:scale {process}={sum(needed.get(service, 0) for service in services)}'
            for process, services in processes.items()]


def act(rows, command, acted):
    """Run ``command`` for each service whose need changed since the last time it was acted on
    (the first time: whose need differs from its live workers)."""
    for row in rows:
        if acted.get(row['service'], row['workers']) != row['needed']:
            words = [word.format(service=row['service'], workers=row['needed'], delta=row['delta'])
                     for word in shlex.split(command)]
            done = subprocess.run(words, check=False)
            if done.returncode == 0:
                acted[row['service']] = row['needed']
            else:
                print(f'capacity: {" ".join(words)} exited with {done.returncode}', file=sys.stderr)


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
    try:
        settings = load_settings()
        if not settings.redis_url:
            raise SettingsError('REDIS_URL is not set')
    except SettingsError as error:
        sys.exit(f'settings error: {error}')
    connection = gateway_redis(settings)
    acted = {}
    while True:
        try:
            loads = read_loads(connection, settings, start_delay_extra=args.watch or 0.0)
        except (redis.ConnectionError, redis.TimeoutError) as error:
            if not args.watch:
                sys.exit(f'capacity: Redis is unavailable: {error}')
            print(f'capacity: Redis is unavailable, trying again in {args.watch:g} s: {error}', file=sys.stderr)
        else:
            rows = report(loads, plan(loads, settings.max_workers_total))
            if args.json:
                print(json.dumps(rows, indent=2))
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
