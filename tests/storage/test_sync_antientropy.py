"""sync against real redis-servers: the epoch makes a flushed primary refuse the next batch, and the
held index compared with the primary's seen-set finds every trade the primary lost silently."""

import io
import time

import pytest

from btcfeed import config, keys

from btcfeed.storage import epochs
from btcfeed.storage.antientropy import HeldIndex, compare
from btcfeed.storage.apply import (BatchApplier, compressed_batch, expected_candles, is_epoch_error,
                                   read_candles, read_trades)
from btcfeed.events import recent_events
from btcfeed.lifecycle import EventLog
from tools.redis_process import RedisProcess
from btcfeed.trade import encode_batch
from btcfeed.processes.sync import Sync
from btcfeed.processes.writer import DRAINING, FAILOVER, PRIMARY, read_state, set_state
from samples import make_trades

pytestmark = pytest.mark.integration
SOURCE = "binance:BTCUSDT"
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def servers(tmp_path, monkeypatch):
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


def write_like_the_writer(local, primary, trades, batch=500):
    """What the writer does in primary state: apply to the primary (epoch checked) and mirror locally."""
    applier = BatchApplier(primary, DAY_MS, SOURCE, epochs=epochs.known_epochs(local))
    for start in range(0, len(trades), batch):
        payload = encode_batch(trades[start:start + batch])
        applier.apply_many([(SOURCE, payload)])
        entry_id = local.xadd(keys.mirror(SOURCE), compressed_batch(payload))
        local.hset(keys.MIRROR_CONFIRMED, SOURCE, entry_id)


def run_until(sync, done, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sync.loop_once(time.monotonic())
        if done():
            return
    raise AssertionError("sync did not get there in time")


def primary_ids(primary):
    return [t.id for t in read_trades(primary, SOURCE)]


def events(local, name):
    return [e["fields"] for e in recent_events(local, 200) if e["event"] == name]


def test_a_flushed_primary_refuses_the_next_batch_and_gets_everything_back(servers, tmp_path):
    local_server, primary_server = servers
    local, primary = local_server.client(), primary_server.client()
    assert epochs.establish(local, primary, [SOURCE]) == [SOURCE]
    trades = make_trades(1, 6000)
    write_like_the_writer(local, primary, trades[:5000])
    sync = make_sync(local_server, primary_server, tmp_path)
    run_until(sync, lambda: sync.sweep is None)

    primary.flushall()                                    # the same run_id: nothing else would tell
    with pytest.raises(Exception) as refused:
        write_like_the_writer(local, primary, trades[5000:])
    assert is_epoch_error(refused.value) and primary.dbsize() == 0
    sync.next_watch = 0
    sync.loop_once(time.monotonic())                      # the watch sees the epoch gone, too
    assert read_state(local) == FAILOVER
    assert events(local, "primary_changed")

    run_until(sync, lambda: read_state(local) == DRAINING)
    # The live feed goes on first (the backlog would be replayed here); history follows.
    run_until(sync, lambda: read_state(local) == PRIMARY and sync.sweep is None)
    write_like_the_writer(local, primary, trades[5000:])  # the writer, with the new epoch
    run_until(sync, lambda: primary.xlen(keys.trades(SOURCE)) == 6000)
    assert sorted(primary_ids(primary)) == [t.id for t in trades]
    assert read_candles(primary, SOURCE) == expected_candles(trades)
    assert int(primary.hget(keys.last(SOURCE), "id")) == trades[-1].id
    done = events(local, "reseed_done")[0]
    assert done["trades_added"] == 5000 and "new epoch" in done["reason"]


def test_a_lost_tail_of_a_replay_is_found_without_any_restart(servers, tmp_path):
    """The primary kept its epoch and its run_id but lost its last writes (an AOF tail, a replay cut
    short): only comparing seen-sets can tell."""
    local_server, primary_server = servers
    local, primary = local_server.client(), primary_server.client()
    epochs.establish(local, primary, [SOURCE])
    trades = make_trades(1, 4000)
    # The failover copy holds everything (written during an outage) ...
    BatchApplier(local, DAY_MS, SOURCE, publish=False).apply_trades(SOURCE, trades)
    # ... the primary holds what the replay delivered before it lost the rest.
    BatchApplier(primary, DAY_MS, SOURCE).apply_trades(SOURCE, trades[:1500])
    sync = make_sync(local_server, primary_server, tmp_path)
    run_until(sync, lambda: primary.xlen(keys.trades(SOURCE)) == 4000, timeout_s=10)
    assert primary_ids(primary) == [t.id for t in trades]
    assert read_candles(primary, SOURCE) == expected_candles(trades)
    repair = events(local, "repair")[0]
    assert repair["missing"] == repair["trades_added"] == 2500 and repair["not_held"] == 0


def test_comparison_is_exact_across_a_segment_edge_and_ignores_ids_below_the_floor(servers):
    local_server, primary_server = servers
    local, primary = local_server.client(), primary_server.client()
    edge = 5 * 65536
    trades = make_trades(edge - 300, 600)
    for start in range(0, 600, 100):
        entry_id = local.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch(trades[start:start + 100])))
    lost = {edge - 3, edge - 2, edge, edge + 250}
    BatchApplier(primary, DAY_MS, SOURCE).apply_trades(SOURCE, [t for t in trades if t.id not in lost])
    index = HeldIndex(local, SOURCE)
    assert index.follow(entry_id) == {4, 5}
    assert compare(local, primary, SOURCE, [4, 5]).ids() == sorted(lost)
    primary.hset(keys.meta(SOURCE), "floor", edge - 1)       # older than the primary's window
    assert compare(local, primary, SOURCE, [4, 5]).ids() == [edge, edge + 250]


def test_a_sweep_cut_short_is_taken_up_again_after_a_restart(servers, tmp_path):
    local_server, primary_server = servers
    local, primary = local_server.client(), primary_server.client()
    epochs.establish(local, primary, [SOURCE])
    trades = make_trades(1, 3000)
    write_like_the_writer(local, primary, trades)
    local.hset(keys.SYNC_PRIMARY, "sweep", "primary restarted (new run_id)")   # left by a killed sync
    primary.delete(keys.seen_segment(SOURCE, 1), keys.trades(SOURCE))       # what the primary lost
    sync = make_sync(local_server, primary_server, tmp_path)
    sync.recent[SOURCE].clear()
    run_until(sync, lambda: sync.sweep is None)
    assert sorted(primary_ids(primary)) == [t.id for t in trades]
    assert not local.hexists(keys.SYNC_PRIMARY, "sweep")


def test_a_batch_the_primary_has_not_confirmed_is_not_compared(servers, tmp_path):
    """The writer mirrors a batch while the primary applies it: until its ACK confirms the batch, the
    held index leaves it out, so a batch on its way is not re-sent (harmless, but needless)."""
    local_server, primary_server = servers
    local = local_server.client()
    epochs.establish(local, primary_server.client(), [SOURCE])
    local.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch(make_trades(1, 100))))
    sync = make_sync(local_server, primary_server, tmp_path)
    for _ in range(5):
        sync.loop_once(time.monotonic())
    assert read_state(local) == PRIMARY
    assert not events(local, "primary_changed") and not events(local, "repair")
    assert primary_server.client().dbsize() == 2             # the meta hash and the probe key
    assert sync.verified_ms > 0


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


def test_the_held_index_forgets_segments_the_local_copy_no_longer_holds(servers):
    local_server, _ = servers
    local = local_server.client()
    trades = make_trades(65_536 - 100, 300)          # segments 0 and 1
    first = local.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch(trades[:50])))   # segment 0 only
    last = local.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch(trades[50:])))    # segments 0 and 1
    index = HeldIndex(local, SOURCE)
    assert index.follow(last) == {0, 1}
    assert index.prune() == 0
    local.xdel(keys.mirror(SOURCE), first)            # trimmed: segment 0 still has trades in `last`
    assert index.prune() == 0 and index.segments() == [1, 0]
    local.xdel(keys.mirror(SOURCE), last)
    assert index.prune() == 2 and index.segments() == []
    assert not local.exists(keys.held_prefix(SOURCE) + "0", keys.held_prefix(SOURCE) + "1")
