"""Bad input and misconfiguration: a clear reason in health and logs, trades kept locally, nothing lost."""

import json

import pytest
import redis

from btcfeed import keys
from btcfeed.storage.apply import batch_payload
from tools.redis_process import RedisProcess
from btcfeed.commands.stack import Stack
from harness import (SOURCE, Simulator, drain, health_when, local_client, remove_stack, short_tmpdir,
                     stack_env, verify_derived, verify_primary, wait_for)

pytestmark = pytest.mark.integration
RATE = 1000
PASSWORD = "s3cret-pw"


@pytest.fixture
def sim():
    simulator = Simulator(rate=RATE, seed=5)
    yield simulator
    simulator.stop()


@pytest.fixture
def primary():
    server = RedisProcess(short_tmpdir("bf-primary-"), password=PASSWORD).start()
    yield server
    server.stop()


def local(stack):
    return redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5,
                       decode_responses=True)


def good_url(primary):
    return f"redis://:{PASSWORD}@127.0.0.1:{primary.port}/0"


BAD_URLS = {
    "wrong password": (lambda p: f"redis://:not-the-password@127.0.0.1:{p.port}/0",
                       "check the user name and password"),
    "no password": (lambda p: f"redis://127.0.0.1:{p.port}/0", "check the user name and password"),
    "wrong database index": (lambda p: f"redis://:{PASSWORD}@127.0.0.1:{p.port}/99", "database index"),
    "TLS to a plain port": (lambda p: f"rediss://:{PASSWORD}@127.0.0.1:{p.port}/0",
                            "is that port serving TLS"),
}


@pytest.mark.parametrize("case", sorted(BAD_URLS))
def test_misconfigured_primary_keeps_trades_locally_until_fixed(primary, sim, case):
    make_url, reason_part = BAD_URLS[case]
    bad_url = make_url(primary)
    state_dir = short_tmpdir("bf-stack-")
    env = stack_env(primary, sim, BTCFEED_PRIMARY_URL=bad_url)
    stack = Stack(state_dir, env)
    stack.up()
    try:
        wait_for(lambda: local(stack).hget(keys.WRITER_STATE, "state") == "failover", 15, "failover")
        wait_for(lambda: local(stack).xlen(keys.BACKLOG) > 5, 15, "trades kept in the backlog")
        code, document = wait_for(health_when(stack, lambda answer: answer[1]["status"] == "degraded"), 10,
                                  "health to report the problem")
        assert code == 200
        assert any(reason_part in r for r in document["reasons"]), document["reasons"]
        assert local(stack).xlen(keys.trades(SOURCE)) > 0          # the local copy has them
        stack.down()
        # The operator fixes the URL; the same state dir carries the backlog over.
        stack = Stack(state_dir, {**env, "BTCFEED_PRIMARY_URL": good_url(primary)})
        stack.up()
        wait_for(lambda: local(stack).hget(keys.WRITER_STATE, "state") == "primary", 30, "hand-back")
        client = primary.client()
        last_id = drain(client, sim)
        first = int(local(stack).xrange(keys.trades(SOURCE), count=1)[0][1]["id"])
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last_id)
        for name in ("writer", "sync", "health", "ingest"):
            text = open(stack.log_path(name)).read()
            assert PASSWORD not in text and "not-the-password" not in text
        assert PASSWORD not in json.dumps(document)
    finally:
        remove_stack(stack)


def test_primary_that_is_a_replica_from_the_start(sim):
    master = RedisProcess(short_tmpdir("bf-master-")).start()
    replica = RedisProcess(short_tmpdir("bf-replica-"),
                           extra_args=["--replicaof", "127.0.0.1", str(master.port)]).start()
    stack = Stack(short_tmpdir("bf-stack-"), stack_env(replica, sim))
    stack.up()
    try:
        wait_for(lambda: local(stack).hget(keys.WRITER_STATE, "state") == "failover", 15,
                 "failover on READONLY")
        code, document = wait_for(health_when(stack, lambda answer: "replica" in json.dumps(answer[1])), 10,
                                  "health to name the replica")
        assert code == 200 and document["status"] == "degraded"
        replica.client().replicaof("NO", "ONE")
        wait_for(lambda: local(stack).hget(keys.WRITER_STATE, "state") == "primary", 30, "hand-back")
        client = replica.client()
        drain(client, sim)
        first = int(local(stack).xrange(keys.trades(SOURCE), count=1)[0][1]["id"])
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
    finally:
        remove_stack(stack)
        replica.stop()
        master.stop()


def test_malformed_exchange_messages_are_dead_lettered_never_traded(sim):
    primary = RedisProcess(short_tmpdir("bf-primary-")).start()
    stack = Stack(short_tmpdir("bf-stack-"), stack_env(primary, sim))
    stack.up()
    try:
        client = primary.client()
        wait_for(lambda: client.xlen(keys.trades(SOURCE)) > RATE, 15, "trades flowing")
        sim.client.fault("garbage")
        wait_for(lambda: local(stack).xlen(keys.DEADLETTER) >= 6, 10, "six dead letters")
        letters = [fields for _, fields in local(stack).xrange(keys.DEADLETTER)]
        reasons = " | ".join(f["reason"] for f in letters)
        for needle in ("malformed JSON", "unknown message shape", "binary frame", "expected BTCUSDT",
                       "price is zero", "price is not a decimal"):
            assert needle in reasons, reasons
        assert int(local(stack).hget(keys.source_stats(SOURCE), "deadlettered")) == 6
        assert stack.info("ingest")["statename"] == "RUNNING"
        drain(client, sim)
        verdict = verify_primary(client, sim)
        assert verdict.exact(), str(verdict)      # id 5 (the fake trades) is not there
    finally:
        remove_stack(stack)
        primary.stop()


def test_full_backlog_holds_ingest_loudly_and_loses_nothing(sim):
    primary = RedisProcess(short_tmpdir("bf-primary-")).start()
    # Tiny bounds: the backlog fills within seconds while the primary is down.
    stack = Stack(short_tmpdir("bf-stack-"), stack_env(primary, sim, BTCFEED_BACKLOG_MAX_TRADES="3000",
                                                        BTCFEED_BUS_MAX_ENTRIES="20"))
    stack.up()
    try:
        client = primary.client()
        wait_for(lambda: client.xlen(keys.trades(SOURCE)) > RATE, 15, "trades flowing")
        primary.kill()
        # The writer holds at the backlog's bound (3,000 trades: about 3 s of trades), so the bus
        # fills and ingest holds.
        wait_for(lambda: "event=backlog_full" in open(stack.log_path("writer")).read(), 30,
                 "the writer to hold at the backlog's bound")
        wait_for(lambda: "event=bus_full_ingest_held" in open(stack.log_path("ingest")).read(), 30,
                 "ingest to hold on a full bus")
        # The bound is in trades, and the count is what the entries hold.
        held = int(local(stack).get(keys.BACKLOG_TRADES))
        in_entries = sum(len(json.loads(batch_payload(fields)))
                         for _, fields in local_client(stack).xrange(keys.BACKLOG))
        assert held == in_entries and 1000 < held <= 3000, (held, in_entries)
        primary.start()
        wait_for(lambda: local(stack).hget(keys.WRITER_STATE, "state") == "primary", 60, "hand-back")
        client = primary.client()
        drain(client, sim, timeout_s=90)
        verdict = verify_primary(client, sim)
        assert verdict.exact(), str(verdict)
    finally:
        remove_stack(stack)
        primary.stop()
