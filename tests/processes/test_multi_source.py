"""Several sources at once, one simulator per exchange: a stalled, rate-limited, garbage-sending or dead
exchange never holds up the others, and every source ends exact in the primary."""

import json
import signal
import time

import pytest
import redis

from btcfeed import keys
from btcfeed.config import Source, load
from harness import Simulator, assert_exact, primary_last_id, remove_stack, start_sources_stack, wait_for

pytestmark = pytest.mark.integration
RATES = {"binance": 600, "coinbase": 500, "kraken": 300}
STATS_FIELDS = {"trades", "gaps", "backfilled", "deadlettered", "reconnects", "duplicates", "last_id",
                "last_trade_ts", "last_price", "connected"}


def test_three_sources_configure_side_by_side():
    config = load({"BTCFEED_SOURCES": "binance:BTCUSDT,coinbase:BTC-USD,kraken:BTC/USD"})
    assert config.sources == (Source("binance", "BTCUSDT"), Source("coinbase", "BTC-USD"),
                              Source("kraken", "BTC/USD"))
    assert len({keys.trades(s.name) for s in config.sources}) == 3


@pytest.fixture
def sims():
    started = {mode: Simulator(rate=rate, mode=mode) for mode, rate in RATES.items()}
    yield started
    for sim in started.values():
        if sim.process.poll() is None:
            sim.process.send_signal(signal.SIGCONT)
            sim.stop()


def last_ids(primary_client, sims) -> dict:
    return {mode: primary_last_id(primary_client, sim.source) for mode, sim in sims.items()}


def wait_all_flowing(primary_client, sims, seconds: float = 1.0) -> None:
    start = last_ids(primary_client, sims)
    wait_for(lambda: all(primary_last_id(primary_client, sim.source) >= start[mode] + RATES[mode] * seconds
                         for mode, sim in sims.items()), 30, "every source to flow")


def assert_others_flow(primary_client, sims, victim: str, seconds: float) -> None:
    """During the fault, every other source keeps landing trades at about its rate."""
    before = last_ids(primary_client, sims)
    time.sleep(seconds)
    after = last_ids(primary_client, sims)
    for mode in sims:
        if mode != victim:
            assert after[mode] - before[mode] >= RATES[mode] * seconds * 0.5, (mode, before, after)



def ingest_stats(stack) -> dict:
    """Per-source stats from ingest's heartbeat in the local Redis (what the health API reads)."""
    local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock")
    try:
        beat = local.get(keys.heartbeat("ingest"))
        return json.loads(beat)["sources"] if beat else {}
    finally:
        local.close()


def coinbase_stats(stack) -> dict:
    return (ingest_stats(stack) or {}).get("coinbase:BTC-USD", {})


def test_one_exchange_black_holed_then_another_misbehaving_the_rest_keep_flowing(
        primary, primary_client, sims):
    stack = start_sources_stack(primary, list(sims.values()))
    try:
        wait_all_flowing(primary_client, sims)
        # Kraken's simulator frozen whole (SIGSTOP): its websocket and its REST both hang.
        sims["kraken"].process.send_signal(signal.SIGSTOP)
        try:
            assert_others_flow(primary_client, sims, "kraken", 4.0)
        finally:
            sims["kraken"].process.send_signal(signal.SIGCONT)
        # Coinbase drops the connection, refuses the backfill with a 429 storm and sends garbage.
        control = sims["coinbase"].client
        control.fault("rest429", count=4)
        control.fault("drop")
        assert_others_flow(primary_client, sims, "coinbase", 1.5)
        wait_for(lambda: coinbase_stats(stack).get("connected") and coinbase_stats(stack).get("reconnects"),
                 20, "coinbase to reconnect")
        control.fault("garbage")
        assert_others_flow(primary_client, sims, "coinbase", 1.5)
        wait_for(lambda: coinbase_stats(stack).get("deadlettered", 0) >= 5, 10,
                 "the garbage to be dead-lettered")
        wait_all_flowing(primary_client, sims)
        for sim in sims.values():
            assert_exact(primary_client, sim)
        stats = wait_for(lambda: ingest_stats(stack), 5, "ingest heartbeat")
        assert set(stats) == {sim.source for sim in sims.values()}
        for source, fields in stats.items():
            assert STATS_FIELDS <= set(fields), (source, sorted(fields))
        assert stats["coinbase:BTC-USD"]["deadlettered"] >= 5 and stats["coinbase:BTC-USD"]["reconnects"] >= 1
        assert stats["binance:BTCUSDT"]["deadlettered"] == stats["kraken:BTC/USD"]["deadlettered"] == 0
        log = open(stack.log_path("ingest")).read()
        assert "event=rest_rate_limited source=coinbase:BTC-USD" in log
    except AssertionError:
        print(open(stack.log_path("ingest")).read()[-6000:])
        raise
    finally:
        remove_stack(stack)


def test_a_dead_exchange_never_stalls_the_others(primary, primary_client, sims):
    stack = start_sources_stack(primary, list(sims.values()))
    try:
        wait_all_flowing(primary_client, sims)
        victim = sims.pop("coinbase")
        assert_exact(primary_client, victim)       # its trades so far are exact before it dies
        victim.process.kill()
        victim.process.wait(10)
        survivors = dict(sims)
        assert_others_flow(primary_client, survivors, "coinbase", 6.0)
        for sim in survivors.values():
            assert_exact(primary_client, sim)
        stats = ingest_stats(stack)
        assert stats["coinbase:BTC-USD"]["connected"] is False
        assert stats["binance:BTCUSDT"]["connected"] and stats["kraken:BTC/USD"]["connected"]
        assert "event=connect_failed source=coinbase:BTC-USD" in open(stack.log_path("ingest")).read()
    finally:
        remove_stack(stack)
