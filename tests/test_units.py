"""Small pure parts: reconnect backoff, the health verdict, the bus trim id."""

import random
import statistics

import pytest

from common.backoff import Backoff
from processes.health import HEARTBEAT_STALE_MS, TRADE_AGE_WARN_MS, WATCHED_PROCESSES, assess
from processes.writer import _next_id


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


# --- health verdict -----------------------------------------------------------------------------

NOW = 1_700_000_000_000
FRESH = {"binance:BTCUSDT": {"connected": True, "last_id": 99, "last_trade_ts": NOW - 1000, "trades": 5,
                             "pending": 0}}


def beats(ages=None, writer_state="primary", sources=None):
    """Heartbeats as the processes write them; an age of None drops that process's heartbeat."""
    ages = {**{process: 100 for process in WATCHED_PROCESSES}, **(ages or {})}
    result = {process: {"ts": NOW - age} for process, age in ages.items() if age is not None}
    if "ingest" in result:
        result["ingest"]["sources"] = FRESH if sources is None else sources
    if "writer" in result:
        result["writer"].update(state=writer_state, applied=12, skipped=0, to_backlog=0,
                                last_apply_ms=NOW - 300, primary_ok=writer_state == "primary")
    return result


def test_ingest_and_writer_are_watched():
    assert {"ingest", "writer"} <= set(WATCHED_PROCESSES)


def test_all_fresh_is_ok():
    verdict = assess(beats(), NOW)
    assert verdict["status"] == "ok" and verdict["reasons"] == []
    assert verdict["sources"] == {"binance:BTCUSDT": {"connected": True, "last_id": 99,
                                                      "last_trade_ts": NOW - 1000}}
    assert verdict["writer"]["applied"] == 12 and verdict["writer"]["last_apply_ms"] == NOW - 300


@pytest.mark.parametrize("process", WATCHED_PROCESSES)
def test_missing_heartbeat_is_critical(process):
    verdict = assess(beats(ages={process: None}), NOW)
    assert verdict["status"] == "critical"
    assert verdict["reasons"] == [f"{process} has no heartbeat"]


def test_heartbeats_read_as_none_are_missing():
    # read_heartbeats gives None for an expired key.
    verdict = assess({process: None for process in WATCHED_PROCESSES}, NOW)
    assert verdict["status"] == "critical"
    assert verdict["reasons"] == [f"{process} has no heartbeat" for process in WATCHED_PROCESSES]
    assert verdict["sources"] == {} and not any(verdict["writer"].values())


def test_nothing_at_all_is_critical():
    assert assess({}, NOW)["status"] == "critical"


@pytest.mark.parametrize("process", WATCHED_PROCESSES)
def test_stale_heartbeat_is_critical(process):
    verdict = assess(beats(ages={process: 12_000}), NOW)
    assert verdict["status"] == "critical"
    assert verdict["reasons"] == [f"{process} heartbeat is 12s old"]


def test_heartbeat_exactly_at_the_limit_is_still_fresh():
    assert assess(beats(ages={"writer": HEARTBEAT_STALE_MS}), NOW)["status"] == "ok"
    assert assess(beats(ages={"writer": HEARTBEAT_STALE_MS + 1}), NOW)["status"] == "critical"


@pytest.mark.parametrize("state", ["failover", "draining"])
def test_writer_away_from_the_primary_is_degraded(state):
    verdict = assess(beats(writer_state=state), NOW)
    assert verdict["status"] == "degraded"
    assert len(verdict["reasons"]) == 1 and verdict["reasons"][0].startswith(f"writer in {state}")
    assert verdict["writer"]["state"] == state


def test_writer_on_the_primary_is_ok():
    verdict = assess(beats(writer_state="primary"), NOW)
    assert verdict["status"] == "ok" and verdict["writer"]["state"] == "primary"


def test_disconnected_source_is_degraded():
    sources = {"binance:BTCUSDT": {"connected": False, "last_id": 99, "last_trade_ts": NOW - 1000},
               "binance:ETHUSDT": {"connected": True, "last_id": 5, "last_trade_ts": NOW - 10}}
    verdict = assess(beats(sources=sources), NOW)
    assert verdict["status"] == "degraded"
    assert verdict["reasons"] == ["binance:BTCUSDT is not connected"]
    assert set(verdict["sources"]) == {"binance:BTCUSDT", "binance:ETHUSDT"}


def test_quiet_source_is_degraded():
    sources = {"binance:BTCUSDT": {"connected": True, "last_id": 99, "last_trade_ts": NOW - 95_000}}
    verdict = assess(beats(sources=sources), NOW)
    assert verdict["status"] == "degraded"
    assert verdict["reasons"] == ["binance:BTCUSDT: last trade 95s ago"]


def test_trade_age_exactly_at_the_limit_is_fine():
    at_limit = {"binance:BTCUSDT": {"connected": True, "last_trade_ts": NOW - TRADE_AGE_WARN_MS}}
    assert assess(beats(sources=at_limit), NOW)["status"] == "ok"


def test_source_without_any_trade_yet_is_not_called_quiet():
    sources = {"binance:BTCUSDT": {"connected": True, "last_id": None, "last_trade_ts": 0}}
    assert assess(beats(sources=sources), NOW)["status"] == "ok"


def test_problems_come_before_warnings():
    sources = {"binance:BTCUSDT": {"connected": False}}
    verdict = assess(beats(ages={"writer": None}, sources=sources), NOW)
    assert verdict["status"] == "critical"
    assert verdict["reasons"] == ["writer has no heartbeat", "binance:BTCUSDT is not connected"]


def test_verdict_does_not_pass_unknown_fields_through():
    verdict = assess(beats(), NOW)
    assert "trades" not in verdict["sources"]["binance:BTCUSDT"] and "skipped" not in verdict["writer"]


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
