"""Failover to the local copy and replay into the primary, under real faults of real servers."""

import json
import os
import signal
import time

import pytest

from btcfeed import keys
from btcfeed.storage.apply import batch_payload

from tools import verify
from btcfeed.events import recent_events
from tools.redis_process import RedisProcess
from harness import (SOURCE, drain, health, health_when, local_client, primary_last_id, remove_stack,
                     short_tmpdir, start_stack, verify_derived, verify_primary, wait_for, wait_verified,
                     writer_state)

pytestmark = pytest.mark.integration
RATE = 2000
SEED = 11
OUTAGE_S = 3.0


@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


def event_names(stack) -> list:
    return [e["event"] for e in reversed(recent_events(local_client(stack), 200))]


def wait_trades(client_factory, count, timeout=30):
    client = client_factory()
    start = primary_last_id(client)
    wait_for(lambda: primary_last_id(client_factory()) >= start + count, timeout, f"{count} more trades")


def settle_and_verify(primary, sim, stack):
    """The writer is back on the primary and the primary holds every trade exactly once."""
    wait_for(lambda: writer_state(stack) == "primary", 60, "hand-back to the primary")
    client = primary.client()
    last_id = drain(client, sim)
    wait_verified(stack)
    first = verify.lowest_trade_id(client, SOURCE)
    verdict = verify_primary(client, sim, from_id=first)
    assert verdict.exact(), f"{verdict}; events: {recent_events(local_client(stack), 30)}"
    verify_derived(client, sim, first, last_id)
    assert local_client(stack).xlen(keys.BACKLOG) == 0
    assert not local_client(stack).exists(keys.BACKLOG_TRADES)      # the count starts from zero again
    return verdict


def assert_failed_over_and_back(stack, min_replayed):
    names = event_names(stack)
    assert "failover" in names or "primary_changed" in names, names
    assert "drain_start" in names and "hand_back" in names, names
    replayed = sum(e["fields"]["replayed_trades"] for e in recent_events(local_client(stack), 200)
                   if e["event"] == "hand_back")
    assert replayed >= min_replayed, names


def test_primary_sigkilled_and_restarted_with_data(primary, sim, stack):
    wait_trades(primary.client, RATE)
    primary.kill()
    wait_for(lambda: writer_state(stack) == "failover", 5, "the writer to fail over")
    backlog_before = local_client(stack).xlen(keys.BACKLOG)
    time.sleep(OUTAGE_S)
    assert local_client(stack).xlen(keys.BACKLOG) > backlog_before     # trades keep landing locally
    primary.start()
    settle_and_verify(primary, sim, stack)
    assert_failed_over_and_back(stack, min_replayed=OUTAGE_S * RATE)


def test_a_writer_catching_up_in_failover_coalesces_and_counts_exactly(primary, sim, stack):
    """Bus batches that piled up (the writer was stopped) go into the backlog merged by source, a few
    entries of many trades instead of one per bus batch; the backlog's count is what they hold."""
    wait_trades(primary.client, RATE)
    stack.stop("writer")
    primary.kill()
    local = local_client(stack)
    wait_for(lambda: local.xlen(keys.BUS) > 200, 30, "bus batches to pile up")
    stack.start("writer")
    wait_for(lambda: writer_state(stack) == "failover", 10, "the writer to fail over")
    wait_for(lambda: local.xpending(keys.BUS, keys.BUS_GROUP)["pending"] == 0
             and local.xlen(keys.BACKLOG) > 0, 30, "the piled-up batches in the backlog")
    entries = local.xrange(keys.BACKLOG)
    counts = [int(fields[b"n"]) for _, fields in entries]
    assert counts == [len(json.loads(batch_payload(fields))) for _, fields in entries]
    assert int(local.get(keys.BACKLOG_TRADES)) >= sum(counts)       # more may have come since the read
    # A live bus batch at this rate holds about RATE * 5 ms = 10 trades; merged rounds hold hundreds.
    assert max(counts) >= 200, counts[:20]
    primary.start()
    settle_and_verify(primary, sim, stack)


def test_primary_black_holed_with_sigstop(primary, sim, stack):
    wait_trades(primary.client, RATE)
    primary.freeze()
    try:
        wait_for(lambda: writer_state(stack) == "failover", 5, "the writer to notice a silent primary")
        time.sleep(OUTAGE_S)
    finally:
        primary.thaw()
    settle_and_verify(primary, sim, stack)
    assert_failed_over_and_back(stack, min_replayed=OUTAGE_S * RATE)


def test_primary_restarted_empty_is_reseeded(primary, sim, stack):
    wait_trades(primary.client, 2 * RATE)
    first_before = verify.lowest_trade_id(primary.client(), SOURCE)
    primary.kill()
    primary.wipe()
    assert not [name for name in os.listdir(primary.directory) if name.startswith(("appendonly", "dump"))]
    time.sleep(1)
    primary.start()
    settle_and_verify(primary, sim, stack)
    reseeds = [e for e in recent_events(local_client(stack), 200) if e["event"] == "reseed_done"]
    assert reseeds and reseeds[0]["fields"]["trades_added"] >= 2 * RATE, reseeds
    # The trades from before the loss are back too.
    assert verify.lowest_trade_id(primary.client(), SOURCE) == first_before


def test_primary_made_replica_then_promoted(primary, sim, stack):
    other = RedisProcess(short_tmpdir("bf-other-")).start()
    try:
        wait_trades(primary.client, RATE)
        primary.client().replicaof("127.0.0.1", other.port)
        wait_for(lambda: writer_state(stack) == "failover", 10, "the writer to fail over on READONLY")
        time.sleep(OUTAGE_S)
        primary.client().replicaof("NO", "ONE")
        settle_and_verify(primary, sim, stack)
        assert any("replica" in json.dumps(e["fields"]) for e in recent_events(local_client(stack), 200))
    finally:
        other.stop()


def test_primary_refusing_writes_with_oom(primary, sim, stack):
    wait_trades(primary.client, RATE)
    client = primary.client()
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", str(used // 2))
    try:
        wait_for(lambda: writer_state(stack) == "failover", 10, "the writer to fail over on OOM")
        time.sleep(OUTAGE_S)
        assert any("OOM" in json.dumps(e["fields"]) or "memory" in json.dumps(e["fields"])
                   for e in recent_events(local_client(stack), 200))
    finally:
        client.config_set("maxmemory", "0")
    settle_and_verify(primary, sim, stack)


def test_local_redis_sigkilled_and_restarted(primary, sim, stack):
    wait_trades(primary.client, RATE)
    old_pid = stack.kill("redis-local", signal.SIGKILL)
    wait_for(lambda: stack.info("redis-local")["pid"] not in (0, old_pid), 20, "redis-local restarted")
    wait_trades(primary.client, 2 * RATE)
    settle_and_verify(primary, sim, stack)


@pytest.mark.parametrize("victim", ["writer", "sync"])
def test_process_sigkilled_during_replay(primary, sim, stack, victim):
    wait_trades(primary.client, RATE)
    primary.kill()
    wait_for(lambda: writer_state(stack) == "failover", 5, "failover")
    time.sleep(OUTAGE_S)
    # Slow the replay down enough to hit it mid-way: a large backlog and an immediate kill.
    primary.start()
    wait_for(lambda: writer_state(stack) == "draining", 10, "drain to start", interval_s=0.01)
    old_pid = stack.kill(victim, signal.SIGKILL)
    wait_for(lambda: stack.info(victim)["pid"] not in (0, old_pid), 20, f"{victim} restarted")
    settle_and_verify(primary, sim, stack)


def test_health_reports_failover_as_degraded(primary, sim, stack):
    wait_for(lambda: health(stack)[1]["status"] == "ok", 15, "health ok")
    primary.kill()
    code, document = wait_for(health_when(stack, lambda answer: answer[1]["status"] == "degraded"),
                              5, "health to say degraded")
    assert code == 200 and any("failover" in r for r in document["reasons"])
    primary.start()
    settle_and_verify(primary, sim, stack)
