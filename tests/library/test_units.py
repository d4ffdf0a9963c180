"""Small pure parts: reconnect backoff, the bus trim id (the health verdict is in test_status)."""

import random
import statistics

import pytest

from btcfeed.backoff import Backoff, Throttle
from btcfeed.processes.writer import _next_id


# --- backoff ------------------------------------------------------------------------------------

class CeilingRandom(random.Random):
    """Always draws the top of the range, so next_delay returns its ceiling; records every range."""

    def __init__(self):
        super().__init__(0)
        self.ranges = []

    def uniform(self, a, b):
        self.ranges.append((a, b))
        return b


def ceilings(backoff, count):
    return [backoff.next_delay() for _ in range(count)]


def test_ceiling_doubles_from_base_up_to_the_cap():
    backoff = Backoff(base_s=0.25, cap_s=30.0, rng=CeilingRandom())
    assert ceilings(backoff, 10) == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert all(low == 0 for low, _ in backoff.rng.ranges)


def test_ceiling_stays_at_the_cap_however_long_it_fails():
    backoff = Backoff(base_s=0.1, cap_s=5.0, rng=CeilingRandom())
    assert set(ceilings(backoff, 5000)[10:]) == {5.0}


def test_base_above_cap_is_capped():
    assert ceilings(Backoff(base_s=10.0, cap_s=2.0, rng=CeilingRandom()), 3) == [2.0, 2.0, 2.0]


def test_reset_brings_the_ceiling_back_to_base():
    backoff = Backoff(base_s=0.5, cap_s=60.0, rng=CeilingRandom())
    ceilings(backoff, 20)
    backoff.reset()
    assert ceilings(backoff, 3) == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("base, cap", [(0.25, 30.0), (0.01, 0.05), (1.0, 1.0), (2.0, 600.0)])
def test_delays_never_exceed_the_cap_nor_go_below_zero(base, cap):
    backoff = Backoff(base_s=base, cap_s=cap, rng=random.Random(7))
    delays = ceilings(backoff, 3000)
    assert all(0 <= delay <= cap for delay in delays)
    assert max(delays) > 0.9 * cap  # the cap is reached, not just respected


def test_default_random_source_respects_the_cap():
    delays = ceilings(Backoff(base_s=0.25, cap_s=3.0), 500)
    assert all(0 <= delay <= 3.0 for delay in delays) and len(set(delays)) > 400


def draws_per_attempt(seed, attempts=8, runs=2000, base=0.25, cap=1000.0):
    """The delays of each attempt number over many failure runs (reset between runs)."""
    backoff = Backoff(base_s=base, cap_s=cap, rng=random.Random(seed))
    per_attempt = [[] for _ in range(attempts)]
    for _ in range(runs):
        backoff.reset()
        for draws in per_attempt:
            draws.append(backoff.next_delay())
    return per_attempt


def test_ceiling_grows_exponentially_with_seeded_draws():
    per_attempt = draws_per_attempt(seed=11)
    for attempt, draws in enumerate(per_attempt):
        ceiling = 0.25 * 2 ** attempt
        assert max(draws) <= ceiling
        assert max(draws) > 0.99 * ceiling
        # Full jitter: the mean of a uniform draw on [0, ceiling] is half the ceiling.
        assert statistics.fmean(draws) == pytest.approx(ceiling / 2, rel=0.06)
    means = [statistics.fmean(draws) for draws in per_attempt]
    assert all(later / earlier == pytest.approx(2, rel=0.12) for earlier, later in zip(means, means[1:]))


def test_full_jitter_spreads_draws_over_the_whole_range():
    backoff = Backoff(base_s=8.0, cap_s=8.0, rng=random.Random(3))
    delays = ceilings(backoff, 10_000)
    assert min(delays) < 0.01 * 8.0 and max(delays) > 0.99 * 8.0
    bins = [0] * 10
    for delay in delays:
        bins[min(int(delay / 0.8), 9)] += 1
    assert all(800 <= count <= 1200 for count in bins), bins


def test_same_seed_same_delays_and_different_hosts_spread_out():
    a = ceilings(Backoff(rng=random.Random(1)), 20)
    assert a == ceilings(Backoff(rng=random.Random(1)), 20)
    assert a != ceilings(Backoff(rng=random.Random(2)), 20)


# --- bus trim id --------------------------------------------------------------------------------

@pytest.mark.parametrize("entry_id, following", [
    (b"1700000000000-0", "1700000000000-1"), (b"5-41", "5-42"), (b"0-0", "0-1"), (b"12-9", "12-10"),
])
def test_next_id(entry_id, following):
    assert _next_id(entry_id) == following


def stream_order(entry_id: str):
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def test_next_id_is_the_smallest_id_after_the_given_one():
    rng = random.Random(5)
    for _ in range(1000):
        ms, seq = rng.randrange(2 ** 45), rng.randrange(2 ** 20)
        following = _next_id(f"{ms}-{seq}".encode())
        assert stream_order(following) == (ms, seq + 1)
        assert stream_order(following) > (ms, seq)


def test_a_throttle_says_yes_once_per_interval_for_each_key():
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.due() and not throttle.due()
    assert throttle.due("coinbase") and not throttle.due("coinbase")
    now[0] = 109.9
    assert not throttle.due()
    now[0] = 110.0
    assert throttle.due() and not throttle.due()
