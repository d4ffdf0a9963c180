"""bench-availability's slot accounting on synthetic timelines (no stack, no clock)."""

from tools.bench.availability import _FirstSeen, exactness, freshness, price_lags, schedule, trade_lags

# Trades 100..109 printed 100 ms apart from t=1,000 ms.
FIRST = 100
PRINTED = [1000 + 100 * i for i in range(10)]


def test_a_trade_consumer_lags_by_the_age_of_the_oldest_trade_it_lacks():
    samples = [1000, 1500, 1950, 2500, 3000]
    latest = [99, 100, 100, 109, 103]
    # 1000: lacks 100, printed at 1000 -> 0; 1500: lacks 101 (1100) -> 400; 1950: 850;
    # 2500: holds the newest trade -> 0; 3000: lacks 104 (1400) -> 1600.
    assert trade_lags(samples, latest, FIRST, PRINTED) == [0, 400, 850, 0, 1600]


def test_a_trade_not_yet_printed_is_not_lacked():
    # At 1050 only trade 100 exists; a consumer holding it is current, as is one past the known history.
    assert trade_lags([1050, 5000], [100, 109], FIRST, PRINTED) == [0, 0]


def test_a_price_lags_by_the_newest_trade_of_any_source():
    binance = [1000, 1100, 1200]            # then quiet
    coinbase = [1000, 1500, 2000, 2500, 3000]
    # At 2600 the newest trade anywhere is coinbase's of 2500: a binance price of 1200 is 1300 behind.
    assert price_lags([1150, 2600, 3000], [1100, 1200, 2500], [binance, coinbase]) == [0, 1300, 500]


def test_slots_fresh_share_longest_stale_stretch_and_where():
    lags = [0, 1000, 1001, 1500, 0, 2000, 2100, 2200, 0, 0]
    phases = ["calm"] * 4 + ["fault"] * 6
    result = freshness(lags, phases)
    assert (result.slots, result.fresh) == (10, 5)          # 1000 ms behind still counts as fresh
    assert result.longest_stale_ms == 300
    assert result.stale_by_phase == {"calm": 2, "fault": 3}
    assert result.worst_lag_ms == 2200
    assert result.stretches == [("calm", 2, 2, 1500), ("fault", 1, 3, 2200)]


def test_missing_and_duplicated_ids_in_the_window_only():
    received = [5, 10, 11, 11, 13, 14, 14, 14, 20]
    # Window 10..15: 12 and 15 missing; 11 and 14 duplicated; 5 and 20 are outside.
    assert exactness(received, 10, 15) == (2, 2)


def test_the_schedule_scales_every_phase_and_kills_each_feed_process():
    full, quick = schedule(1.0), schedule(0.1)
    assert [step[0] for step in full] == [step[0] for step in quick]
    assert abs(sum(s for _, s, _ in quick) - sum(s for _, s, _ in full) * 0.1) < 1e-6
    actions = [action for _, _, action in full]
    assert actions[:7] == [None, "primary_kill", "primary_restart", "primary_stop", "primary_cont",
                           "binance_pause", "binance_resume"]
    assert actions[7:] == [f"kill:{name}" for name in ("ingest", "writer", "sync", "health", "api")]


def test_with_two_hosts_the_kills_hit_host_a_and_host_a_is_then_lost_whole():
    actions = [action for _, _, action in schedule(1.0, hosts=2)]
    assert actions[:-2] == [action for _, _, action in schedule(1.0)]
    assert actions[-2:] == ["host_kill", "host_start"]


def test_the_sse_merge_takes_each_id_once_from_either_host_and_keeps_a_hosts_own_repeats():
    taken = []
    merged = _FirstSeen(taken.append)
    merged.offer(10, None)          # host A's first
    merged.offer(10, None)          # host B's first: A gave it already
    merged.offer(11, 10)            # A
    merged.offer(12, 10)            # B is ahead now
    merged.offer(12, 11)            # A catches up: not again
    merged.offer(13, 12)            # A
    merged.offer(12, 13)            # A repeats an id it sent before: its own duplicate, kept for the count
    assert taken == [10, 11, 12, 13, 12]
    assert exactness(taken, 10, 13) == (0, 1)
