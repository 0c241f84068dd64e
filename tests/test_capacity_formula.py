"""The capacity formula and the sharing of max_workers_total, against sums done by hand.

Pure arithmetic: no Redis, no fixture of conftest.py. Each case writes its
arithmetic in a comment, with D the duration, rate the arrival rate over a
window of W seconds (300 unless said), Q the queued jobs, A the wait of the
job at the head of the queue (unknown unless said: then T / 2), T the target
wait, R the start delay and u the target utilisation.
"""

import logging

from capacity import ServiceLoad, needed_workers, notes, share_total


def load(**given):
    """A ServiceLoad with neutral values for whatever a test does not set (all workers busy)."""
    values = {'name': 'svc', 'queued': 0, 'busy': 0, 'arrival_rate': None,
              'mean_duration': 60.0, 'p90_duration': None, 'min_workers': 0, 'max_workers': 100,
              'target_wait': 60.0, 'expected_duration': 60.0}
    values.update(given)
    values.setdefault('running', values['busy'])
    values.setdefault('workers', values['busy'])
    return ServiceLoad(**values)


# -- needed_workers -------------------------------------------------------------

def test_steady_state_keeps_utilisation_under_target():
    # work = 0.1/s * 60 s = 6 workers; present = min(6, busy 6 + Q 0) = 6
    # steady = 6 + 6 * (1/0.75 - 1) = 6 + 2 = 8 (= 6 / 0.75); backlog = busy 6
    assert needed_workers(load(arrival_rate=0.1, busy=6, target_utilisation=0.75)) == 8


def test_backlog_alone_is_drained_within_target_wait():
    # no rate: steady = 0
    # the 4 busy workers are trusted with 4 * 60 * 0.5 / 60 = 2 queued jobs; 14 - 2 = 12 left
    # a new worker starts 1 + (60 - 0) / 60 = 2 jobs within T: 12 / 2 = 6 new
    # backlog = 4 + 6 = 10
    assert needed_workers(load(busy=4, queued=14)) == 10


def test_steady_state_and_backlog_take_the_larger():
    # the 20 queued jobs leave the rate: 0.1 - 20/300 = 0.0333; present = min(0.0333 * 60 = 2, 6 + 20) = 2
    # steady = 2 + 0.1 * 60 * (1/0.75 - 1) = 2 + 2 = 4
    # trusted to busy: 6 * (60 - 30) / 60 = 3; (20 - 3) / (1 + 60 / 60) = 8.5
    # backlog = 6 + 8.5 = 14.5 -> 15
    assert needed_workers(load(arrival_rate=0.1, busy=6, queued=20,
                               target_utilisation=0.75)) == 15


def test_queue_the_busy_workers_start_in_time_needs_no_new_worker():
    # trusted to busy: 6 * 60 * 0.5 / 60 = 3 >= Q 3: backlog = busy 6; no rate: steady = 0
    assert needed_workers(load(busy=6, queued=3)) == 6


def test_slow_start_makes_each_new_worker_count_for_fewer_jobs():
    # as the backlog case, but R = 45: a new worker starts 1 + (60 - 45) / 60 = 1.25 jobs
    # backlog = 4 + (14 - 2) / 1.25 = 4 + 9.6 = 13.6 -> 14
    assert needed_workers(load(busy=4, queued=14, start_delay=45)) == 14


def test_start_later_than_target_wait_asks_one_worker_per_queued_job():
    # R = 90 > T = 60: a new worker starts only its first job, 1 + max(0, 60 - 90) / 60 = 1
    # backlog = 4 + (14 - 2) / 1 = 16
    assert needed_workers(load(busy=4, queued=14, start_delay=90)) == 16


def test_rate_is_capped_by_the_jobs_in_hand():
    # work = 0.2 * 60 = 12, but only busy 3 + Q 0 = 3 jobs in hand: present = 3
    # steady = 3 + 12 * (1/0.75 - 1) = 3 + 4 = 7 (uncapped it would be 12 / 0.75 = 16)
    assert needed_workers(load(arrival_rate=0.2, busy=3, target_utilisation=0.75)) == 7


def test_start_later_than_target_wait_counts_coming_jobs_as_in_hand():
    # as above, but R = 90 > T = 60: the next 0.2 * (90 - 60) = 6 arrivals count as in hand
    # present = min(12, 3 + 0 + 6) = 9; steady = 9 + 4 = 13
    assert needed_workers(load(arrival_rate=0.2, busy=3, target_utilisation=0.75,
                               start_delay=90)) == 13


def test_queued_arrivals_leave_the_rate_to_the_backlog_term():
    # rate without the queued: 0.2 - 6/300 = 0.18; present = min(0.18 * 60 = 10.8, 10 + 6) = 10.8
    # steady = 10.8 + 0.2 * 60 * (1/0.75 - 1) = 10.8 + 4 = 14.8 -> 15 (with all of the rate: 12 + 4 = 16)
    # backlog: trusted to busy 10 * (60 - 30) / 60 = 5; 10 + (6 - 5) / 2 = 10.5
    assert needed_workers(load(arrival_rate=0.2, busy=10, queued=6, target_utilisation=0.75)) == 15


def test_arrival_window_sets_the_share_of_the_rate_the_queued_jobs_take():
    # W = 600: 0.2 - 12/600 = 0.18; present = min(10.8, 10 + 12) = 10.8; steady = 10.8 + 4 = 14.8 -> 15
    # (with W = 300: 0.2 - 12/300 = 0.16; 9.6 + 4 = 13.6 -> 14)
    # backlog: 10 + (12 - 5) / 2 = 13.5
    assert needed_workers(load(arrival_rate=0.2, busy=10, queued=12, arrival_window=600,
                               target_utilisation=0.75)) == 15


def test_queued_arrivals_stay_in_the_rate_when_a_new_worker_starts_too_late():
    # R = 90 >= T = 60: no correction, rate 0.2; in hand 10 + 6 + 0.2 * (90 - 60) = 22
    # present = min(0.2 * 60 = 12, 22) = 12; steady = 12 + 4 = 16
    # backlog: A taken as 30, trusted to busy 5; a new worker starts 1 job: 10 + (6 - 5) / 1 = 11
    assert needed_workers(load(arrival_rate=0.2, busy=10, queued=6, target_utilisation=0.75,
                               start_delay=90)) == 16


def test_long_waited_head_leaves_less_of_the_queue_to_the_busy_workers():
    # A = 45: trusted to busy 4 * (60 - 45) / 60 = 1; (14 - 1) / (1 + 60 / 60) = 6.5
    # backlog = 4 + 6.5 = 10.5 -> 11 (A unknown, taken as 30: 10)
    assert needed_workers(load(busy=4, queued=14, oldest_wait=45)) == 11


def test_fresh_head_leaves_more_of_the_queue_to_the_busy_workers():
    # A = 0: trusted to busy 4 * (60 - 0) / 60 = 4; (14 - 4) / 2 = 5; backlog = 4 + 5 = 9 (unknown: 10)
    assert needed_workers(load(busy=4, queued=14, oldest_wait=0)) == 9


def test_head_waited_beyond_target_leaves_nothing_to_the_busy_workers():
    # A = 90 > T = 60: trusted to busy 4 * max(0, 60 - 90) / 60 = 0; backlog = 4 + 14 / 2 = 11
    assert needed_workers(load(busy=4, queued=14, oldest_wait=90)) == 11


def test_head_wait_is_not_relied_on_when_a_new_worker_starts_too_late():
    # R = 90 >= T = 60: A = 0 is set aside for T / 2 = 30: trusted to busy 4 * 30 / 60 = 2
    # a new worker starts 1 job: backlog = 4 + (14 - 2) / 1 = 16 (with A = 0: 4 + 10 = 14)
    assert needed_workers(load(busy=4, queued=14, oldest_wait=0, start_delay=90)) == 16


def test_no_duration_history_falls_back_to_expected_duration():
    # D = expected 120 (mean None): work = 0.05 * 120 = 6; present = min(6, 6) = 6
    # steady = 6 / 0.75 = 8 (with D = 60 it would be 3 / 0.75 = 4)
    assert needed_workers(load(arrival_rate=0.05, busy=6, mean_duration=None,
                               expected_duration=120, target_utilisation=0.75)) == 8


def test_jobs_recorded_as_lasting_no_time_need_no_more_than_the_busy_workers():
    # failures at once record 0 s; D is held at 1 ms: the busy worker is trusted with
    # 1 * 60 * 0.5 / 0.001 = 30000 queued jobs >= Q 5, so backlog = busy 1
    assert needed_workers(load(busy=1, queued=5, mean_duration=0.0)) == 1


def test_zero_arrivals_and_empty_queue_give_min_workers():
    # rate 0, Q 0, busy 0: both terms are 0; min_workers 2
    assert needed_workers(load(arrival_rate=0.0, min_workers=2)) == 2


def test_min_workers_raises_a_small_need():
    # work = 0.01 * 60 = 0.6; present = min(0.6, 0) = 0; steady = 0.6 * (1/0.75 - 1) = 0.2 -> 1
    # min_workers 3 > 1
    assert needed_workers(load(arrival_rate=0.01, min_workers=3, target_utilisation=0.75)) == 3


def test_max_workers_caps_the_need():
    # rate without the queued: 1 - 50/300 = 0.8333; present = min(0.8333 * 60 = 50, 10 + 50) = 50
    # steady = 50 + 1 * 60 * (1/0.75 - 1) = 50 + 20 = 70 > max 20
    assert needed_workers(load(arrival_rate=1.0, busy=10, queued=50, max_workers=20,
                               target_utilisation=0.75)) == 20


def test_never_below_busy_even_above_max_workers():
    # 12 workers are running jobs though max_workers is now 10: stopping 2 would kill jobs
    assert needed_workers(load(busy=12, max_workers=10)) == 12


def test_float_noise_does_not_add_a_worker():
    # work = 0.07 * 90 = 6.300000000000001; steady = 6.3 / 0.7 = 9.000000000000002, which is 9
    assert needed_workers(load(arrival_rate=0.07, mean_duration=90, busy=7,
                               target_utilisation=0.7)) == 9


# -- share_total ----------------------------------------------------------------

def loads(**services):
    """ServiceLoads by name from (min_workers, busy, max_workers) triples."""
    return {name: load(name=name, min_workers=minimum, busy=busy, max_workers=maximum)
            for name, (minimum, busy, maximum) in services.items()}


def test_share_total_under_the_total_gives_every_need():
    # 3 + 4 = 7 <= 10
    assert share_total({'a': 3, 'b': 4}, loads(a=(0, 0, 10), b=(0, 0, 10)), 10) == {'a': 3, 'b': 4}


def test_share_total_over_the_total_divides_the_rest_by_need():
    # 9 + 3 = 12 > 8; floors 1 + 1, 6 left; needs above floors 8 and 2 (10)
    # shares 6 * 8/10 = 4.8 and 6 * 2/10 = 1.2 -> 4 and 1, 1 left over, to a (.8 > .2)
    # a = 1 + 4 + 1 = 6, b = 1 + 1 = 2
    assert share_total({'a': 9, 'b': 3}, loads(a=(1, 0, 10), b=(1, 0, 10)), 8) == {'a': 6, 'b': 2}


def test_share_total_gives_minimums_first():
    # b needs 1 but its minimum is 3; floors 0 + 3, 3 left, all to a (the only need above floor)
    assert share_total({'a': 10, 'b': 1}, loads(a=(0, 0, 10), b=(3, 0, 10)), 6) == {'a': 3, 'b': 3}


def test_share_total_keeps_busy_workers_in_the_floor():
    # floors: a max(0, busy 6) = 6, b 0; 4 left; above floors 2 and 8 (10)
    # shares 0.8 and 3.2 -> 0 and 3, 1 left over, to a (.8 > .2): a = 7, b = 3
    assert share_total({'a': 8, 'b': 8}, loads(a=(0, 6, 10), b=(0, 0, 10)), 10) == {'a': 7, 'b': 3}


def test_share_total_rounds_by_largest_remainder():
    # floors 1 + 1 + 1, 5 left; above floors 5, 3, 1 (9)
    # shares 25/9 = 2.78, 15/9 = 1.67, 5/9 = 0.56 -> 2, 1, 0 and 2 left over, to a and b
    # (plain rounding would give 3 + 2 + 1 = 6 > 5)
    services = loads(a=(1, 0, 10), b=(1, 0, 10), c=(1, 0, 10))
    shared = share_total({'a': 6, 'b': 4, 'c': 2}, services, 8)
    assert shared == {'a': 4, 'b': 3, 'c': 1}


def test_share_total_breaks_remainder_ties_by_larger_need_then_name():
    # 1 + 3 > 2: shares 2 * 1/4 = 0.5 and 2 * 3/4 = 1.5 -> 0 and 1, equal remainders: b needs more
    assert share_total({'a': 1, 'b': 3}, loads(a=(0, 0, 10), b=(0, 0, 10)), 2) == {'a': 0, 'b': 2}
    # 2 + 2 > 3: shares 1.5 and 1.5, same remainder and need: a by name
    assert share_total({'a': 2, 'b': 2}, loads(a=(0, 0, 10), b=(0, 0, 10)), 3) == {'a': 2, 'b': 1}


def test_share_total_caps_each_need_at_max_workers():
    # a's 30 is capped at its max 10; 10 + 2 = 12 <= 20
    shared = share_total({'a': 30, 'b': 2}, loads(a=(0, 0, 10), b=(0, 0, 10)), 20)
    assert shared == {'a': 10, 'b': 2}


def test_share_total_never_gives_more_than_the_need():
    # a's max 10 caps it at 10; 10 + 9 = 19 > 12; above floors 10 and 9 (19)
    # shares 12 * 10/19 = 6.32 and 12 * 9/19 = 5.68 -> 6 and 5, 1 left over, to b (.68 > .32)
    shared = share_total({'a': 30, 'b': 9}, loads(a=(0, 0, 10), b=(0, 0, 10)), 12)
    assert shared == {'a': 6, 'b': 6}
    assert shared['a'] <= 10 and shared['b'] <= 9


def test_share_total_keeps_minimums_above_the_total_and_warns(caplog):
    # minimums 4 + 4 = 8 > 6: both kept, and said
    with caplog.at_level(logging.WARNING, logger='capacity'):
        shared = share_total({'a': 5, 'b': 5}, loads(a=(4, 0, 10), b=(4, 0, 10)), 6)
    assert shared == {'a': 4, 'b': 4}
    assert 'exceed max_workers_total (6)' in caplog.text


# -- notes ----------------------------------------------------------------------

def test_note_401_when_the_minimum_holds_more_workers_than_needed():
    assert any(note.startswith('code 401') for note in notes(load(min_workers=1), 1))


def test_no_note_401_when_the_need_is_the_minimum_anyway():
    # T = 60, D = 60, R = 0: backlog = 4 / (1 + 60 / 60) = 2, the minimum
    assert not any(note.startswith('code 401') for note in notes(load(queued=4, min_workers=2), 2))


def test_note_400_when_max_workers_holds_the_need_back():
    assert any(note.startswith('code 400') for note in notes(load(queued=100, max_workers=2), 2))
