"""Silent faults of the primary against the real stack: the primary loses data and the writer sees no
error. Each must end with every trade exactly once, detected and repaired without cron."""

import datetime
import time

import pytest

from btcfeed import keys

from tools import verify
from btcfeed.events import recent_events
from harness import (SOURCE, Simulator, drain, health, primary_last_id, remove_stack, start_sources_stack,
                     start_stack, verify_derived, verify_primary, wait_for, wait_verified, local_client,
                     writer_state)

pytestmark = pytest.mark.integration
RATE = 2000
SEED = 23


@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


# A source's candle key turned into a string at once (the hash kept under another name), and back.
SWAP_CANDLE_FOR_STRING = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('RENAME', KEYS[1], KEYS[2]) end
redis.call('SET', KEYS[1], 'not a candle')
"""
PUT_CANDLE_BACK = """
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[1]) end
"""


def wait_trades(client, count, timeout=30):
    start = primary_last_id(client)
    wait_for(lambda: primary_last_id(client) >= start + count, timeout, f"{count} more trades")


def assert_exact_since(primary, sim, stack, first_id):
    """Every trade from first_id to the last one the exchange printed, exactly once, with candles and last."""
    client = primary.client()
    last_id = drain(client, sim)
    wait_verified(stack)
    verdict = verify_primary(client, sim, from_id=first_id)
    assert verdict.exact(), f"{verdict}; events: {recent_events(local_client(stack), 30)}"
    verify_derived(client, sim, first_id, last_id)
    return verdict


def report(what: str, fault_ms: int, stack) -> None:
    """Detection-to-repair figures for the note: from the fault to the end of the last repair."""
    events = recent_events(local_client(stack), 200)
    repairs = [e for e in events if e["event"] in ("repair", "reseed_done") and e["ts"] >= fault_ms]
    assert repairs, f"{what}: no repair after the fault"
    added = sum(e["fields"].get("trades_added", 0) for e in repairs if e["event"] == "repair")
    print(f"\n{what}: repaired {(max(e['ts'] for e in repairs) - fault_ms) / 1000:.2f} s after the fault, "
          f"{added} trades re-sent")


def test_flushall_on_a_live_primary_is_refused_at_once_and_refilled(primary, sim, stack):
    client = primary.client()
    wait_trades(client, 2 * RATE)
    first = verify.lowest_trade_id(client, SOURCE)
    fault_ms = int(time.time() * 1000)
    client.flushall()                    # same server, same run_id: only the epoch can tell
    wait_for(lambda: any(e["event"] in ("failover", "primary_changed")
                         for e in recent_events(local_client(stack), 50)), 10, "the loss to be noticed")
    wait_trades(client, RATE)
    assert_exact_since(primary, sim, stack, first)
    report("FLUSHALL", fault_ms, stack)
    assert any(e["event"] == "reseed_done" for e in recent_events(local_client(stack), 200))


def test_primary_restarted_empty_within_a_fifth_of_a_second(primary, sim, stack):
    client = primary.client()
    wait_trades(client, 2 * RATE)
    first = verify.lowest_trade_id(client, SOURCE)
    fault_ms = int(time.time() * 1000)
    primary.kill()
    primary.wipe()
    primary.start()                      # back, empty, before the writer's quick retry gives up
    wait_trades(primary.client(), RATE)
    assert_exact_since(primary, sim, stack, first)
    report("restart empty", fault_ms, stack)


def test_primary_losing_the_tail_of_a_replay(primary, sim, stack):
    """A host crash right after the hand-back: the primary comes back with its epoch and its older
    data, but the newest part of its AOF (the replay's tail and the live writes after it) is gone."""
    client = primary.client()
    wait_trades(client, RATE)
    first = verify.lowest_trade_id(client, SOURCE)
    client.client_pause(3000, all=True)      # an outage the writer fails over for, then a replay
    wait_for(lambda: writer_state(stack) == "failover", 10, "failover")
    wait_for(lambda: writer_state(stack) == "primary", 30, "hand-back")
    fault_ms = int(time.time() * 1000)
    primary.kill()
    assert primary.lose_aof_tail(0.3) > 0
    primary.start()
    lost_last = primary_last_id(primary.client())
    wait_trades(primary.client(), RATE)
    assert_exact_since(primary, sim, stack, first)
    report("AOF tail", fault_ms, stack)
    assert lost_last < primary_last_id(primary.client())


def test_local_redis_at_its_memory_limit_never_wedges_the_writer(primary, sim, stack):
    """The limit met on a healthy primary (a retention window that does not fit): the mirror gives way,
    trades keep landing, and health goes on saying the local copy is short of the retention window
    after the limit is no longer met, not only for the moment it is."""
    local = local_client(stack)
    client = primary.client()
    wait_trades(client, 2 * RATE)
    first = verify.lowest_trade_id(client, SOURCE)
    used = int(local.info("memory")["used_memory"])
    local.config_set("maxmemory", str(used + 256 * 1024))
    try:
        wait_for(lambda: any(e["event"] == "local_memory_full" for e in recent_events(local, 100)), 30,
                 "the writer to meet the memory limit")
        wait_trades(client, 2 * RATE, timeout=30)          # still landing: the mirror gave way
    finally:
        local.config_set("maxmemory", "0")
    assert_exact_since(primary, sim, stack, first)
    wait_for(lambda: not local.exists(keys.LOCAL_PRESSURE), 10, "the pressure record to clear")
    names = [e["event"] for e in recent_events(local, 300)]
    assert "local_memory_full" in names and "local_memory_ok" in names
    cut_ms = int(local.hget(keys.LOCAL_WINDOW_CUT, SOURCE))
    oldest_mirrored_ms = int(local.xrange(keys.mirror(SOURCE), count=1)[0][0].split(b"-")[0])
    assert cut_ms <= oldest_mirrored_ms and cut_ms > time.time() * 1000 - 60_000
    code, document = health(stack)
    assert document["status"] == "degraded", document
    assert [reason for reason in document["reasons"]
            if reason.startswith(f"the local copy of {SOURCE} holds ")
            and "retention window" in reason and "raise maxmemory" in reason], document["reasons"]


def test_local_redis_full_during_a_primary_outage_then_every_trade_lands_once(primary, sim, stack):
    """The primary is away long enough for the failover copy and the backlog to fill the local Redis
    up to its limit (kept the whole time): ingest has to hold, the exchange goes on printing. Once the
    primary is back, the backlog drains, the room comes back, the backfill brings what ingest could not
    take, and the primary ends with every trade once: no wedge, no loss, no duplicate. Ingest says it
    is held in a line every 10 s, not twice a second."""
    local = local_client(stack)
    client = primary.client()
    wait_trades(client, 2 * RATE)
    first = verify.lowest_trade_id(client, SOURCE)
    used = int(local.info("memory")["used_memory"])
    local.config_set("maxmemory", str(used + 6 * 1024 * 1024))
    try:
        primary.kill()
        wait_for(lambda: any(e["event"] == "local_memory_full" for e in recent_events(local, 200)), 60,
                 "the local Redis to reach its limit during the outage")
        wait_for(lambda: "local_redis_full_ingest_held" in open(stack.log_path("ingest")).read(), 30,
                 "ingest to be held by the full local Redis")
        time.sleep(12)                         # held at the limit while the exchange prints on
        primary.start()
        wait_for(lambda: writer_state(stack) == "primary", 120, "the hand-back")
        wait_trades(primary.client(), 2 * RATE, timeout=60)
        assert_exact_since(primary, sim, stack, first)
    finally:
        local.config_set("maxmemory", "0")
    ingest_log = open(stack.log_path("ingest")).read()
    # Held until the replay made room, after the primary's return too: one line each 10 s of it.
    held_at = [datetime.datetime.strptime(line.split()[0], "time=%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
               for line in ingest_log.splitlines() if "event=local_redis_full_ingest_held" in line]
    assert held_at, "ingest never said it was held"
    assert all(later - earlier >= 9.5 for earlier, later in zip(held_at, held_at[1:])), held_at
    assert "event=backfilled" in ingest_log            # what ingest could not take came over REST


def test_a_wrong_type_key_refuses_one_source_and_the_others_go_on(primary):
    """Somebody else's string where one source's next candle goes: that source's batches are refused
    whole (never half applied) and left to sync, the other source keeps landing, the writer stays on
    the primary; once the key is gone, sync re-sends what was refused. Both end exact."""
    sims = [Simulator(rate=RATE, seed=SEED), Simulator(rate=500, seed=SEED, mode="coinbase")]
    stack = start_sources_stack(primary, sims)
    try:
        client = primary.client()
        victim, other = sims
        wait_for(lambda: all(primary_last_id(client, sim.source) > 0 for sim in (victim, other)),
                 30, "both sources in the primary")
        firsts = {sim.source: verify.lowest_trade_id(client, sim.source) for sim in sims}
        # The current minute's candle becomes somebody else's string, in one step; its contents wait
        # aside (the trades already in it are not sent again) and come back with the key at the end.
        if time.time() % 60 > 50:
            time.sleep(60.2 - time.time() % 60)    # so that the minute's batches go on for a while
        minute = (int(time.time() * 1000) // 60000) * 60000
        candle, aside = keys.candle(victim.source, minute), keys.candle(victim.source, minute) + ":aside"
        client.eval(SWAP_CANDLE_FOR_STRING, 2, candle, aside)
        local = local_client(stack)
        wait_for(lambda: any(e["event"] == "batch_refused" for e in recent_events(local, 50)), 20,
                 "the batches of that minute to be refused")
        stuck = primary_last_id(client, victim.source)
        flowing = primary_last_id(client, other.source)
        time.sleep(3)
        assert writer_state(stack) == "primary"
        assert primary_last_id(client, victim.source) == stuck          # refused whole, nothing half done
        assert primary_last_id(client, other.source) >= flowing + 500   # the other source goes on
        client.eval(PUT_CANDLE_BACK, 2, candle, aside)
        for sim in sims:
            last = drain(client, sim)
            wait_verified(stack)
            verdict = verify_primary(client, sim, from_id=firsts[sim.source])
            assert verdict.exact(), f"{sim.source}: {verdict}"
            verify_derived(client, sim, firsts[sim.source], last)
        assert any(e["event"] == "repair_refused" for e in recent_events(local, 200))
    finally:
        remove_stack(stack)
        for sim in sims:
            sim.stop()
