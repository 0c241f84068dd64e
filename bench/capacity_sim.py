"""Replay the same traffic against three autoscaling rules and compare waits and cost.

A discrete-event simulation of services whose workers an autoscaler resizes
every ``interval`` simulated seconds. Each scenario draws its traffic once,
from a fixed seed, and every policy is run on that same traffic:

(a) ``capacity.plan`` (``needed_workers``, then ``share_total``), fed only
    what capacity.py can read from Redis: queue length, running jobs, live
    and busy workers, how long the job at the head of the queue has waited
    (RQ's ``enqueued_at`` of that job), the arrival rate over the last
    ``ARRIVAL_WINDOW`` seconds and the mean of the last
    ``RECENT_DURATIONS_KEPT`` finished jobs (records.py's, as the gateway's);
(b) KEDA's Redis list scaler: ``ceil(list length / listLength)`` within the
    service's min/max replicas, the list being RQ's queue (a started job has
    left it), with the Kubernetes HPA's scale-down stabilisation window;
(c) the seed's elasticity loop (crim-ca/ServiceGateway ``rubber.py``).

The physics are the same for all: a worker occupies a slot from the scaling
decision on, takes jobs ``boot_delay`` seconds later, and a scale-down lets a
busy worker finish its job before it leaves. Scale-downs take, in order,
requests still waiting for a slot, booting workers, idle ones, then busy
ones (the most recently started job first). With a ``max_workers_total``, a
worker asked for beyond it waits for a free slot, first asked first served,
as a pod waits for room on a full cluster.

Run ``python bench/capacity_sim.py``; bench/README.md has the latest table.
"""

import heapq
import logging
import math
import multiprocessing
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from capacity import ServiceLoad, plan
from records import ARRIVAL_WINDOW, RECENT_DURATIONS_KEPT

HPA_STABILISATION = 300  # seconds: the Kubernetes HPA's default scale-down window

# Event kinds, in the order they are handled when they fall at the same time:
# a worker freed at the instant a job arrives takes it, then the scaler looks.
FINISH, READY, ARRIVE, TICK = range(4)


# -- Traffic ------------------------------------------------------------------

def poisson(rate):
    """Arrivals at a constant ``rate`` per second."""
    def arrivals(rng, horizon):
        return np.sort(rng.uniform(0, horizon, rng.poisson(rate * horizon)))
    return arrivals


def on_off(rate_on, rate_off, mean_on, mean_off):
    """Markov-modulated Poisson: exponential on and off spells, starting off."""
    def arrivals(rng, horizon):
        times, start, on = [], 0.0, False
        while start < horizon:
            end = min(horizon, start + rng.exponential(mean_on if on else mean_off))
            rate = rate_on if on else rate_off
            times.append(rng.uniform(start, end, rng.poisson(rate * (end - start))))
            start, on = end, not on
        return np.sort(np.concatenate(times))
    return arrivals


def batches(period, size, spread, background):
    """``size`` jobs within ``spread`` seconds every ``period``, over a Poisson background."""
    def arrivals(rng, horizon):
        times = [poisson(background)(rng, horizon)]
        for start in np.arange(period / 2, horizon, period):
            times.append(rng.uniform(start, start + spread, size))
        return np.sort(np.concatenate(times))
    return arrivals


def exponential(mean):
    def durations(rng, count):
        return rng.exponential(mean, count)
    return durations


def lognormal(mean, sigma):
    """Long-tailed durations with the given mean (mu = ln(mean) - sigma^2 / 2)."""
    def durations(rng, count):
        return rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, count)
    return durations


@dataclass(frozen=True)
class Service:
    name: str
    arrivals: object
    durations: object
    target_wait: float
    expected_duration: float
    min_workers: int = 1
    max_workers: int = 40


@dataclass(frozen=True)
class Scenario:
    name: str
    services: tuple
    horizon: float = 24 * 3600
    boot_delay: float = 30.0
    interval: float = 15.0
    max_workers_total: int | None = None
    seed: int = 1

    def traffic(self):
        """Arrival times and durations per service, drawn once from the seed."""
        rng = np.random.default_rng(self.seed)
        drawn = {}
        for service in self.services:
            arrivals = service.arrivals(rng, self.horizon)
            drawn[service.name] = (arrivals, service.durations(rng, len(arrivals)))
        return drawn


SCENARIOS = (
    Scenario('steady, exponential', (
        Service('svc', poisson(0.1), exponential(60), target_wait=60, expected_duration=60,
                max_workers=20),)),
    Scenario('steady, lognormal', (
        Service('svc', poisson(0.1), lognormal(60, 1.25), target_wait=60, expected_duration=60,
                max_workers=20),), seed=2),
    Scenario('on/off, exponential', (
        Service('svc', on_off(0.4, 0.03, 600, 1800), exponential(60), target_wait=120,
                expected_duration=60),), seed=3),
    Scenario('batches, lognormal', (
        Service('svc', batches(1800, 80, 60, 0.02), lognormal(120, 1.25), target_wait=300,
                expected_duration=120),), interval=30, seed=4),
    Scenario('shared total of 20', (
        Service('steady', poisson(0.1), exponential(60), target_wait=60, expected_duration=60,
                max_workers=20),
        Service('bursty', on_off(0.1, 0.01, 600, 1800), lognormal(90, 1.25), target_wait=180,
                expected_duration=90, max_workers=20)),
        max_workers_total=20, seed=5),
    # Workers that take longer to start than a job may wait (a VM, a cold node):
    Scenario('steady, slow boot', (
        Service('svc', poisson(0.1), exponential(60), target_wait=60, expected_duration=60,
                max_workers=20),), boot_delay=120, seed=6),
    Scenario('on/off, slow boot', (
        Service('svc', on_off(0.4, 0.03, 600, 1800), exponential(60), target_wait=120,
                expected_duration=60),), boot_delay=120, seed=7),
)


# -- What a scaler can see ------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    """One service at one evaluation: what Redis shows, plus what the scaler itself started."""

    queued: int
    running: int
    workers: int          # live: registered in RQ, including those finishing before they leave
    busy: int
    idle: int
    starting: int         # asked for and not yet live (booting or waiting for a slot)
    replicas: int         # the scaler's own count: starting + live ones not leaving
    arrival_rate: float
    oldest_wait: float | None  # how long the job at the head of the queue has waited; None = empty
    mean_duration: float | None


# -- Policies -------------------------------------------------------------------

class Estimator:
    """(a) capacity.py's core, on what it would read from Redis.

    The operator's settings are the service's, plus ``target_utilisation``
    and the start delay: the boot plus the scaler's own period. The p90
    duration is not observed: the estimate does not use it.
    """

    def __init__(self, target_utilisation):
        self.target_utilisation = target_utilisation
        self.label = f'(a) estimator target_utilisation={target_utilisation}'

    def decide(self, scenario, observations, now):
        loads = {s.name: ServiceLoad(
            name=s.name, queued=o.queued, running=o.running, workers=o.workers, busy=o.busy,
            arrival_rate=o.arrival_rate, arrival_window=ARRIVAL_WINDOW, oldest_wait=o.oldest_wait,
            mean_duration=o.mean_duration, p90_duration=None, min_workers=s.min_workers,
            max_workers=s.max_workers, target_wait=s.target_wait, expected_duration=s.expected_duration,
            target_utilisation=self.target_utilisation,
            start_delay=scenario.boot_delay + scenario.interval)
            for s, o in zip(scenario.services, observations, strict=True)}
        needs = plan(loads, scenario.max_workers_total or 0)
        return [needs[s.name] for s in scenario.services]


class Keda:
    """(b) KEDA's Redis list scaler behind a Kubernetes HPA.

    The HPA asks for ``ceil(list length / list_length)`` replicas (an
    AverageValue metric), within min/max replicas. It scales up at once and
    down only to the highest recommendation of the last ``window`` seconds.
    The HPA's scale-up rate limit and 10 % tolerance are left out, which is
    generous to KEDA.
    """

    def __init__(self, list_length, window):
        self.list_length, self.window = list_length, window
        self.label = f'(b) KEDA listLength={list_length} window={window}s'
        self.history = None

    def decide(self, scenario, observations, now):
        if self.history is None:
            self.history = [deque() for _ in scenario.services]
        desired = []
        for service, seen, history in zip(scenario.services, observations, self.history,
                                          strict=True):
            wanted = math.ceil(seen.queued / self.list_length)
            wanted = min(max(wanted, service.min_workers), service.max_workers)
            history.append((now, wanted))
            while history[0][0] < now - self.window:
                history.popleft()
            highest_recent = max(recommendation for _, recommendation in history)
            desired.append(wanted if wanted >= seen.replicas
                           else min(seen.replicas, highest_recent))
        return desired


class Seed:
    """(c) the seed's elasticity loop, as ``rubber.py`` of crim-ca/ServiceGateway reads.

    Per service and evaluation: when more than ``threshold`` jobs are
    pending, start ``int(pending * spawn_ratio)`` machines minus those still
    booting; when none are pending, tear down the idle machines beyond
    ``min_workers`` (the seed's RUBBER_MIN_IDLE_WORKERS), never going below
    it; in between, do nothing. ``max_workers_total`` is split equally
    between services (the seed's divmod). Two readings: the seed counts as
    booting any machine started in the last 300 s (its slacker threshold),
    here only those not yet taking jobs; and it checks its ceiling against
    live machines only, which could overshoot, so booting ones count here
    too, as the simulation holds every policy to the same budget.
    """

    def __init__(self, spawn_ratio, threshold):
        self.spawn_ratio, self.threshold = spawn_ratio, threshold
        self.label = f'(c) seed spawn_ratio={spawn_ratio} threshold={threshold}'

    def decide(self, scenario, observations, now):
        ceilings = [s.max_workers for s in scenario.services]
        if scenario.max_workers_total is not None:
            each, extra = divmod(scenario.max_workers_total, len(scenario.services))
            ceilings = [each + (i < extra) for i in range(len(scenario.services))]
        desired = []
        for service, seen, ceiling in zip(scenario.services, observations, ceilings, strict=True):
            if seen.queued > self.threshold:
                spawn = int(seen.queued * self.spawn_ratio) - seen.starting
                spawn = min(spawn, ceiling - seen.workers - seen.starting)
                desired.append(seen.replicas + max(spawn, 0))
            elif seen.queued == 0:
                surplus = seen.idle - service.min_workers
                desired.append(max(seen.replicas - max(surplus, 0), service.min_workers))
            else:
                desired.append(seen.replicas)
        return desired


# -- The simulation -------------------------------------------------------------

PENDING, BOOTING, IDLE, BUSY, GONE = range(5)


class Worker:
    __slots__ = ('job_start', 'leaving', 'service', 'since', 'state')

    def __init__(self, service):
        self.service, self.state, self.leaving = service, PENDING, False
        self.since = self.job_start = 0.0


class Simulation:
    """One policy over one scenario's traffic; ``run`` returns waits and worker-seconds."""

    def __init__(self, scenario, traffic, policy):
        self.scenario, self.policy = scenario, policy
        self.count = len(scenario.services)
        self.arrival = [traffic[s.name][0] for s in scenario.services]
        self.duration = [traffic[s.name][1] for s in scenario.services]
        self.waits = [np.full(len(a), np.nan) for a in self.arrival]
        self.worker_seconds = [0.0] * self.count
        self.queue = [deque() for _ in range(self.count)]
        self.workers = [{} for _ in range(self.count)]  # used as ordered sets: runs repeat exactly
        self.idle = [[] for _ in range(self.count)]
        self.recent_arrivals = [deque() for _ in range(self.count)]
        self.finished = [deque(maxlen=RECENT_DURATIONS_KEPT) for _ in range(self.count)]
        self.capacity = scenario.max_workers_total or math.inf
        self.occupied = 0
        self.waiting_for_slot = deque()
        self.events = []
        self.sequence = 0
        self.now = 0.0

    def push(self, when, kind, subject):
        self.sequence += 1
        heapq.heappush(self.events, (when, kind, self.sequence, subject))

    def run(self):
        for service in range(self.count):
            for job, when in enumerate(self.arrival[service]):
                self.push(when, ARRIVE, (service, job))
            for _ in range(self.scenario.services[service].min_workers):
                worker = self.ask_worker(service)
                worker.state = IDLE      # the minimum is already running when traffic starts
                self.idle[service].append(worker)
        self.push(0.0, TICK, None)
        while self.events:
            self.now, kind, _, subject = heapq.heappop(self.events)
            if kind == ARRIVE:
                service, job = subject
                self.queue[service].append(job)
                self.recent_arrivals[service].append(self.now)
                if self.idle[service]:
                    self.take_job(self.idle[service].pop())
            elif kind == FINISH:
                subject.state = IDLE
                self.finished[subject.service].append(self.now - subject.job_start)
                self.take_job(subject)
            elif kind == READY:
                if subject.state == BOOTING:
                    subject.state = IDLE
                    self.take_job(subject)
            else:
                if self.now >= self.scenario.horizon and not any(self.queue):
                    break   # every job has started: the waits are all known
                self.evaluate()
                self.push(self.now + self.scenario.interval, TICK, None)
        self.now = self.scenario.horizon
        for service in range(self.count):
            for worker in self.workers[service]:
                if worker.state != PENDING:
                    self.charge(worker)
        return self.waits, self.worker_seconds

    # Workers come and go

    def ask_worker(self, service):
        worker = Worker(service)
        self.workers[service][worker] = None
        if self.occupied < self.capacity:
            self.boot(worker)
        else:
            self.waiting_for_slot.append(worker)
        return worker

    def boot(self, worker):
        self.occupied += 1
        worker.state, worker.since = BOOTING, self.now
        self.push(self.now + self.scenario.boot_delay, READY, worker)

    def take_job(self, worker):
        if worker.leaving:
            self.leave(worker)
        elif self.queue[worker.service]:
            job = self.queue[worker.service].popleft()
            worker.state, worker.job_start = BUSY, self.now
            self.waits[worker.service][job] = self.now - self.arrival[worker.service][job]
            self.push(self.now + self.duration[worker.service][job], FINISH, worker)
        else:
            worker.state = IDLE
            self.idle[worker.service].append(worker)

    def leave(self, worker):
        """The worker stops and frees its slot for the first one waiting."""
        self.charge(worker)
        worker.state = GONE
        del self.workers[worker.service][worker]
        self.occupied -= 1
        if self.waiting_for_slot:
            self.boot(self.waiting_for_slot.popleft())

    def charge(self, worker):
        """Worker-seconds count from the scaling decision to the exit, within the horizon."""
        end = min(self.now, self.scenario.horizon)
        self.worker_seconds[worker.service] += max(0.0, end - min(worker.since, end))

    def scale(self, service, replicas):
        staying = [w for w in self.workers[service] if not w.leaving]
        for _ in range(replicas - len(staying)):
            self.ask_worker(service)
        surplus = len(staying) - replicas
        if surplus <= 0:
            return
        order = {PENDING: 0, BOOTING: 1, IDLE: 2, BUSY: 3}
        staying.sort(key=lambda w: (order[w.state], -max(w.since, w.job_start)))
        for worker in staying[:surplus]:
            if worker.state == PENDING:
                self.waiting_for_slot.remove(worker)
                worker.state = GONE
                del self.workers[service][worker]
            elif worker.state == BUSY:
                worker.leaving = True
            else:
                if worker.state == IDLE:
                    self.idle[service].remove(worker)
                self.leave(worker)

    # The scaler

    def observe(self, service):
        workers = self.workers[service]
        states = [w.state for w in workers]
        busy, idle = states.count(BUSY), states.count(IDLE)
        starting = states.count(PENDING) + states.count(BOOTING)
        recent = self.recent_arrivals[service]
        while recent and recent[0] < self.now - ARRIVAL_WINDOW:
            recent.popleft()
        finished = self.finished[service]
        return Observation(
            queued=len(self.queue[service]), running=busy, workers=busy + idle, busy=busy,
            idle=idle, starting=starting,
            replicas=sum(1 for w in workers if not w.leaving),
            arrival_rate=len(recent) / ARRIVAL_WINDOW,
            oldest_wait=(self.now - self.arrival[service][self.queue[service][0]]
                         if self.queue[service] else None),
            mean_duration=statistics.fmean(finished) if finished else None)

    def evaluate(self):
        observations = [self.observe(service) for service in range(self.count)]
        desired = self.policy.decide(self.scenario, observations, self.now)
        for service, replicas in enumerate(desired):
            self.scale(service, replicas)


# -- Report ---------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """One policy over one scenario: per service p95 wait and missed share, and the cost."""

    label: str
    p95_wait: tuple
    missed: tuple           # share of jobs whose wait exceeded target_wait
    worker_seconds: tuple

    def meets_target(self, scenario):
        return all(p95 <= s.target_wait
                   for p95, s in zip(self.p95_wait, scenario.services, strict=True))

    def worst_wait(self, scenario):
        """The p95 wait of the service furthest from its target, as a fraction of the target."""
        return max(p95 / s.target_wait
                   for p95, s in zip(self.p95_wait, scenario.services, strict=True))

    @property
    def cost(self):
        return sum(self.worker_seconds)


def simulate(scenario, traffic, policy):
    waits, worker_seconds = Simulation(scenario, traffic, policy).run()
    return Outcome(
        label=policy.label,
        p95_wait=tuple(float(np.percentile(w, 95)) for w in waits),
        missed=tuple(float(np.mean(w > s.target_wait))
                     for w, s in zip(waits, scenario.services, strict=True)),
        worker_seconds=tuple(worker_seconds))


def best(outcomes, scenario):
    """The cheapest outcome within the wait target, or else the one nearest to it."""
    within = [o for o in outcomes if o.meets_target(scenario)]
    if within:
        return min(within, key=lambda o: o.cost)
    return min(outcomes, key=lambda o: o.worst_wait(scenario))


def policies():
    """Every setting tried, per family: each family is judged by its best for the scenario."""
    return {
        '(a)': [Estimator(u) for u in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)],
        '(b)': [Keda(length, window) for length in (1, 2, 3, 5, 10)
                for window in (0, HPA_STABILISATION)],
        '(c)': [Seed(ratio, threshold) for ratio in (0.2, 0.5, 1.0) for threshold in (0, 2, 3)],
    }


def run_scenario(index):
    """All policies over the traffic of ``SCENARIOS[index]``: the outcomes per family."""
    logging.getLogger('capacity').setLevel(logging.ERROR)  # overruns show in the table
    scenario = SCENARIOS[index]
    traffic = scenario.traffic()
    return {family: [simulate(scenario, traffic, policy) for policy in members]
            for family, members in policies().items()}


def report(scenario, outcomes):
    """Print one scenario's table; return whether (a) met the goal there."""
    by_label = {o.label: o for family in outcomes.values() for o in family}
    rows = [
        (by_label['(a) estimator target_utilisation=0.7'], 'default'),
        (best(outcomes['(a)'], scenario), 'best of 6'),
        (by_label[f'(b) KEDA listLength=5 window={HPA_STABILISATION}s'], 'default'),
        (best(outcomes['(b)'], scenario), 'best of 10'),
        (by_label['(c) seed spawn_ratio=0.5 threshold=2'], 'suggested'),
        (best(outcomes['(c)'], scenario), 'best of 9'),
    ]
    print(f'\n## {scenario.name}: {scenario.horizon / 3600:g} h, boot {scenario.boot_delay:g} s, '
          f'evaluated every {scenario.interval:g} s'
          + (f', max_workers_total {scenario.max_workers_total}'
             if scenario.max_workers_total else ''))
    print(f'{"policy":<50} {"service":<7} {"p95 wait":>8} {"target":>6} {"missed":>6} '
          f'{"worker-h":>8}')
    for outcome, tag in rows:
        label = f'{outcome.label} ({tag})'
        for i, service in enumerate(scenario.services):
            print(f'{label if i == 0 else "":<50} {service.name:<7} {outcome.p95_wait[i]:>8.1f} '
                  f'{service.target_wait:>6g} {outcome.missed[i]:>6.1%} '
                  f'{outcome.worker_seconds[i] / 3600:>8.1f}')
    estimator = best(outcomes['(a)'], scenario)
    reference = best(outcomes['(b)'] + outcomes['(c)'], scenario)
    goal = (estimator.meets_target(scenario) and estimator.cost < reference.cost
            and estimator.worst_wait(scenario) <= reference.worst_wait(scenario))
    print(f'reference: {reference.label}'
          + ('' if reference.meets_target(scenario) else ', the nearest: none meets the target'))
    print(f'(a) best / reference: worker-seconds {estimator.cost / reference.cost:.3f}, '
          f'worst p95 / target {estimator.worst_wait(scenario):.2f} vs '
          f'{reference.worst_wait(scenario):.2f}: goal {"met" if goal else "NOT met"}')
    return goal


def main():
    started = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        outcomes = pool.map(run_scenario, range(len(SCENARIOS)))  # closures do not pickle
    print('Autoscaling policies replayed on the same traffic per scenario. p95 wait and target '
          'in seconds;\nmissed = share of jobs that waited longer than the target; worker-h = '
          'hours of booting or live workers.')
    goals = [report(scenario, outcome)
             for scenario, outcome in zip(SCENARIOS, outcomes, strict=True)]
    print(f'\ngoal met in {sum(goals)} of {len(goals)} scenarios '
          f'({time.perf_counter() - started:.0f} s)')


if __name__ == '__main__':
    main()
