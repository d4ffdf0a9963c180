"""sync's re-seed decisions against real redis-servers: a restart that kept its data gets only the
recent writes again, a primary without btcfeed's keys gets the whole local copy."""

import io
import time

import pytest

from common import config, keys
from common.apply import BatchApplier, read_trades
from common.events import recent_events
from common.lifecycle import EventLog
from common.redis_process import RedisProcess
from processes import sync as sync_module
from processes.sync import Sync
from processes.writer import FAILOVER, read_state, set_state
from test_apply import make_trades

pytestmark = pytest.mark.integration
SOURCE = "binance:BTCUSDT"


@pytest.fixture
def servers(tmp_path):
    local = RedisProcess(str(tmp_path / "local")).start()
    primary = RedisProcess(str(tmp_path / "primary")).start()
    yield local, primary
    local.stop()
    primary.stop()


def make_sync(local, primary, tmp_path):
    cfg = config.load({"BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_LOCAL_URL": local.url,
                       "BTCFEED_PRIMARY_URL": primary.url, "BTCFEED_HEALTHY_PROBES": "2"})
    sync = Sync(cfg, EventLog("sync", stream=io.StringIO()))
    sync.initialize()
    return sync


def fill(client, trades, publish=True):
    BatchApplier(client, 24 * 3600 * 1000, SOURCE, publish=publish).apply_trades(
        SOURCE, trades, int(time.time() * 1000))


def recover(sync):
    for _ in range(sync.config.healthy_probes):
        sync.await_recovery()


def test_restart_with_data_resends_only_recent_writes(servers, tmp_path):
    local, primary = servers
    now = int(time.time() * 1000)
    trades = make_trades(10_000, 3000, start_ts=now - 60_000)
    fill(local.client(), trades, publish=False)
    fill(primary.client(), trades[:2000])          # the primary lost its last 1,000 writes
    lc = local.client()
    lc.hset(keys.SYNC_PRIMARY, mapping={"run_id": "run-id-before-restart", "seen_ms": now})
    set_state(lc, FAILOVER, "primary down")
    sync = make_sync(local, primary, tmp_path)
    recover(sync)
    assert read_state(lc) == "draining"
    assert [t.id for t in read_trades(primary.client(), SOURCE)] == [t.id for t in trades]
    done = [e for e in recent_events(lc) if e["event"] == "reseed_done"][0]["fields"]
    assert done["trades_added"] == 1000 and done["scope"].startswith("written since")
    assert done["reason"] == "primary restarted (new run_id)"


def test_old_local_writes_are_not_resent_after_a_restart(servers, tmp_path):
    local, primary = servers
    fill(local.client(), make_trades(1, 500), publish=False)
    time.sleep(0.05)
    lc = local.client()
    # Last seen healthy two minutes after those writes: they predate the margin and are not re-sent.
    seen = int(time.time() * 1000) + 120_000
    lc.hset(keys.SYNC_PRIMARY, mapping={"run_id": "old", "seen_ms": seen})
    fill(primary.client(), make_trades(1, 10))
    set_state(lc, FAILOVER, "primary down")
    recover(make_sync(local, primary, tmp_path))
    done = [e for e in recent_events(lc) if e["event"] == "reseed_done"][0]["fields"]
    assert done["trades_checked"] == 0
    assert primary.client().xlen(keys.trades(SOURCE)) == 10


def test_primary_without_our_keys_gets_the_whole_local_copy(servers, tmp_path, monkeypatch):
    monkeypatch.setattr(sync_module, "SETTLED_AFTER_MS", 0)     # the local copy counts at once
    local, primary = servers
    trades = make_trades(1, 2500)
    fill(local.client(), trades, publish=False)
    lc = local.client()
    lc.hset(keys.SYNC_PRIMARY, mapping={"run_id": "whatever", "seen_ms": int(time.time() * 1000)})
    set_state(lc, FAILOVER, "primary down")
    recover(make_sync(local, primary, tmp_path))
    assert [t.id for t in read_trades(primary.client(), SOURCE)] == [t.id for t in trades]
    done = [e for e in recent_events(lc) if e["event"] == "reseed_done"][0]["fields"]
    assert done["scope"] == "whole local copy" and done["trades_added"] == 2500
    assert done["reason"] == f"primary lost the keys of {SOURCE}"


def test_unhealthy_probe_resets_the_streak(servers, tmp_path):
    local, primary = servers
    lc = local.client()
    set_state(lc, FAILOVER, "primary down")
    sync = make_sync(local, primary, tmp_path)
    sync.await_recovery()
    primary.client().replicaof("127.0.0.1", local.port)     # now a replica: not healthy
    sync.await_recovery()
    assert sync.streak == 0 and read_state(lc) == FAILOVER
    assert any("replica" in str(e["fields"]) for e in recent_events(lc) if e["event"] == "primary_unhealthy")


def test_reseed_reads_the_mirrored_batches_too(servers, tmp_path):
    from common.apply import mirror_entry
    from common.trade import encode_batch
    local, primary = servers
    lc = local.client()
    trades = make_trades(1, 3000)
    for i in range(0, 2000, 500):       # mirrored while the primary was healthy
        lc.xadd(keys.mirror(SOURCE), mirror_entry(encode_batch(trades[i:i + 500])))
    lc.xadd(keys.mirror(SOURCE), mirror_entry(encode_batch(trades[:500])))          # a batch mirrored twice
    fill(lc, trades[2000:], publish=False)                                   # written in failover
    lc.hset(keys.SYNC_PRIMARY, mapping={"run_id": "x", "seen_ms": int(time.time() * 1000)})
    set_state(lc, FAILOVER, "primary down")
    recover(make_sync(local, primary, tmp_path))
    assert sorted(t.id for t in read_trades(primary.client(), SOURCE)) == [t.id for t in trades]


def test_a_local_copy_just_ahead_of_the_primary_is_no_data_loss(servers, tmp_path):
    """The writer mirrors a batch while the primary applies it: at start-up the local copy can be
    a moment ahead of a primary that has no keys yet. That is not a loss and triggers nothing."""
    local, primary = servers
    fill(local.client(), make_trades(1, 100), publish=False)
    lc = local.client()
    sync = make_sync(local, primary, tmp_path)
    sync.watch_primary(time.monotonic())
    assert read_state(lc) == "primary"
    assert not [e for e in recent_events(lc) if e["event"] == "primary_changed"]
