"""A Redis Cluster primary: three masters with a replica each, real redis-server processes on
loopback joined by `redis-cli --cluster create`. Every key of a source shares its hash tag, so the
apply script runs in one slot; the stack stays exact while that slot's master fails over."""

import json
import time
import urllib.error
import urllib.request

import pytest
import redis
from redis.crc import key_slot

from btcfeed import config as config_module

from tools import verify
from btcfeed import keys
from btcfeed.events import recent_events
from harness import (SOURCE, Cluster, drain, remove_stack, start_stack, verify_derived, verify_primary,
                     wait_for, wait_verified)

pytestmark = pytest.mark.integration
RATE = 1000
SEED = 29


@pytest.fixture
def cluster():
    servers = Cluster()
    yield servers
    servers.close()


def last_id(client) -> int:
    value = client.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else -1


def writer_state(stack) -> str:
    local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
    value = local.hget(keys.WRITER_STATE, "state")
    return value.decode() if value else "primary"


def test_a_source_keys_share_one_slot():
    slots = {key_slot(name.encode()) for name in (
        keys.trades(SOURCE), keys.last(SOURCE), keys.candles_index(SOURCE), keys.candle(SOURCE, 60_000),
        keys.seen_segment(SOURCE, 123_456_789), keys.live_channel(SOURCE), keys.source_probe(SOURCE))}
    assert len(slots) == 1


def test_compat_keys_are_refused_on_a_cluster():
    with pytest.raises(config_module.ConfigError, match="BTCFEED_COMPAT_KEYS"):
        config_module.load({"BTCFEED_PRIMARY_URL": "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"})
    cfg = config_module.load({"BTCFEED_PRIMARY_URL": "redis+cluster://127.0.0.1:7000",
                              "BTCFEED_COMPAT_KEYS": "false"})
    assert cfg.compat_source is None


def test_exactly_once_on_a_cluster_while_the_slot_master_fails_over(cluster, sim):
    stack = start_stack(cluster.nodes[0], sim, BTCFEED_PRIMARY_URL=cluster.url, BTCFEED_COMPAT_KEYS="false")
    try:
        client = cluster.client()
        wait_for(lambda: last_id(client) > RATE, 30, "trades in the cluster")
        master = cluster.master_of(keys.trades(SOURCE))
        master.kill()
        killed = time.monotonic()
        wait_for(lambda: writer_state(stack) != "primary", 10, "the writer to fail over")
        wait_for(lambda: cluster.master_of(keys.trades(SOURCE)).port != master.port, 30,
                 "a replica to take the slot")
        promoted = time.monotonic()
        wait_for(lambda: writer_state(stack) == "primary", 60, "the hand-back to the new slot master")
        print(f"slot master replaced {promoted - killed:.2f}s after the kill; "
              f"stack handed back {time.monotonic() - promoted:.2f}s later")
        client = cluster.client()
        last = drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last)
        document = status(stack)
        assert document["redis"]["primary"]["role"] == "cluster (ok)"
        assert len(document["redis"]["primary"]["masters"]) == 3
    finally:
        remove_stack(stack)


def migrate_slot_slowly(cluster, key: str, keys_per_step: int = 2, pause_s: float = 0.5) -> None:
    """A real slot migration (what `redis-cli --cluster reshard` does), a few keys at a time, so the
    slot stays MIGRATING/IMPORTING for seconds while trades flow: new keys answer ASK, a half-moved
    source answers TRYAGAIN."""
    source = cluster.master_of(key)
    slot = cluster.client().keyslot(key)
    masters = [n for n in cluster.nodes
               if n.process.poll() is None and n.client().info("replication")["role"] == "master"]
    target = next(n for n in masters if n.port != source.port)
    source_id, target_id = source.client().cluster("myid"), target.client().cluster("myid")
    target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while True:
        moving = source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_step)
        if not moving:
            break
        source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *moving)
        time.sleep(pause_s)
    # The order `redis-cli --cluster reshard` uses: the target first (it bumps its config epoch), then
    # the source, then the other masters; replicas learn it by gossip, so wait until every node agrees.
    for node in sorted(masters, key=lambda n: (n.port != target.port, n.port != source.port)):
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    wait_for(lambda: all(owner_seen_by(node, slot) == target.port for node in cluster.nodes
                         if node.process.poll() is None), 30, "every node to agree on the slot's new owner")


def owner_seen_by(node, slot: int) -> int:
    for first, last, owner, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
        if first <= slot <= last:
            return int(owner[1])
    return -1


def test_exactly_once_while_the_source_slot_migrates(cluster, sim):
    stack = start_stack(cluster.nodes[0], sim, BTCFEED_PRIMARY_URL=cluster.url, BTCFEED_COMPAT_KEYS="false")
    try:
        client = cluster.client()
        wait_for(lambda: last_id(client) > 2 * RATE, 30, "trades in the cluster")
        before = cluster.master_of(keys.trades(SOURCE)).port
        migrate_slot_slowly(cluster, keys.trades(SOURCE))
        client = cluster.client()
        assert cluster.master_of(keys.trades(SOURCE)).port != before
        wait_for(lambda: writer_state(stack) == "primary", 60, "the writer on the slot's new master")
        last = drain(client, sim)
        wait_verified(stack)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last)
        local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
        refusals = [e["fields"]["reason"] for e in recent_events(local, 300) if e["event"] == "failover"]
        print(f"slot migrated; the writer failed over {len(refusals)} times meanwhile: {refusals[:2]}")
    finally:
        remove_stack(stack)


def status(stack) -> dict:
    try:
        url = f"http://{stack.env['BTCFEED_HEALTH_ADDR']}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.URLError:
        return {}
