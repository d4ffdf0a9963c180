"""The backlog's trade count and the coalescing of a failover round (common/storage/backlog.py),
against a real redis-server: the count always equals the trades its entries hold, a delete sent
twice (a lost reply) takes nothing off twice, an emptied backlog starts from zero, and coalesced
payloads apply to exactly the trades of the batches they came from."""

import orjson
import pytest

from btcfeed import keys
from btcfeed.storage import backlog
from btcfeed.storage.apply import BatchApplier, batch_payload, read_trades
from btcfeed.trade import Trade, encode_batch
from tools.redis_process import RedisProcess

SOURCE = "binance:BTCUSDT"
OTHER = "coinbase:BTC-USD"


@pytest.fixture
def local(tmp_path):
    process = RedisProcess(str(tmp_path / "redis"), appendonly=False).start()
    yield process.client()
    process.stop()


def trades(first, count, ts=1_700_000_000_000):
    return [Trade(first + k, "60000.%02d" % (k % 100), "0.001", "buy", ts + k, ts + k + 5)
            for k in range(count)]


def payload(first, count):
    return encode_batch(trades(first, count))


def append(client, batches):
    pipe = client.pipeline(transaction=True)
    for source, body, count in batches:
        backlog.queue_append(pipe, source, body, count)
    pipe.execute()


def entries_trades(client) -> int:
    """The trades the backlog's entries hold, counted from their payloads (not from n)."""
    return sum(len(orjson.loads(batch_payload(fields))) for _, fields in client.xrange(keys.BACKLOG))


def test_the_count_follows_appends_and_deletes_exactly(local):
    append(local, [(SOURCE, payload(1, 3), 3), (OTHER, payload(100, 5), 5), (SOURCE, payload(4, 2), 2)])
    assert backlog.held_trades(local) == entries_trades(local) == 10
    script = local.register_script(backlog.DELETE_REPLAYED_SCRIPT)
    first_two = local.xrange(keys.BACKLOG, count=2)
    assert backlog.delete_replayed(script, first_two) == 8
    assert backlog.held_trades(local) == entries_trades(local) == 2
    # The same delete again (its reply was lost): nothing is taken off twice.
    assert backlog.delete_replayed(script, first_two) == 0
    assert backlog.held_trades(local) == 2


def test_an_emptied_backlog_starts_from_zero_even_after_a_wrong_count(local):
    append(local, [(SOURCE, payload(1, 4), 4)])
    local.incrby(keys.BACKLOG_TRADES, 1000)        # a count gone wrong by any means
    script = local.register_script(backlog.DELETE_REPLAYED_SCRIPT)
    backlog.delete_replayed(script, local.xrange(keys.BACKLOG))
    assert local.xlen(keys.BACKLOG) == 0
    assert not local.exists(keys.BACKLOG_TRADES)
    append(local, [(SOURCE, payload(5, 2), 2)])
    assert backlog.held_trades(local) == 2


def test_an_entry_without_a_count_is_counted_from_its_payload_and_never_below_zero(local):
    # As an older writer wrote it: no n field, and the count never held it.
    local.xadd(keys.BACKLOG, {"src": SOURCE, "t": payload(1, 7)})
    append(local, [(SOURCE, payload(8, 2), 2)])
    script = local.register_script(backlog.DELETE_REPLAYED_SCRIPT)
    assert backlog.delete_replayed(script, local.xrange(keys.BACKLOG, count=1)) == 7
    assert backlog.held_trades(local) == 0                  # 2 - 7 is clamped, not negative
    assert backlog.batch_trades(local.xrange(keys.BACKLOG)[0][1]) == 2


def test_an_entry_holds_its_payload_compressed_and_gives_back_exactly_those_bytes(local):
    body = payload(1, 9)
    append(local, [(SOURCE, body, 9)])
    (_, fields), = local.xrange(keys.BACKLOG)
    assert b"t" not in fields and len(fields[b"z"]) < len(body) / 2
    assert backlog.entry_batch(fields) == (SOURCE, body)


def test_entries_from_before_compression_and_after_replay_every_trade_once(local, tmp_path):
    # A backlog left by the previous version (plain t) is replayed by this one after an upgrade.
    local.xadd(keys.BACKLOG, {"src": SOURCE, "n": 5, "t": payload(1, 5)})
    append(local, [(SOURCE, payload(4, 6), 6)])
    primary = RedisProcess(str(tmp_path / "primary"), appendonly=False).start()
    try:
        applier = BatchApplier(primary.client(), retention_ms=10 ** 12)
        batches = [backlog.entry_batch(fields) for _, fields in local.xrange(keys.BACKLOG)]
        assert [result[:2] for result in applier.apply_many(batches)] == [[5, 0], [4, 2]]
        assert [trade.id for trade in read_trades(primary.client(), SOURCE)] == list(range(1, 10))
    finally:
        primary.stop()


def test_coalesce_merges_by_source_in_order_up_to_the_cap():
    batches = [(SOURCE, payload(1, 3), 3), (OTHER, payload(500, 2), 2), (SOURCE, payload(4, 4), 4),
               (SOURCE, payload(8, 5), 5), (OTHER, payload(502, 1), 1)]
    merged = backlog.coalesce(batches, max_trades=8)
    assert [(source, count) for source, _, count in merged] == [(SOURCE, 7), (OTHER, 3), (SOURCE, 5)]
    for source, body, count in merged:
        assert len(orjson.loads(body)) == count
    ids = [row[0] for _, body, _ in merged for row in orjson.loads(body)]
    assert sorted(ids) == list(range(1, 13)) + [500, 501, 502]


def test_coalesce_keeps_apart_what_is_not_an_array_and_skips_empty_ones():
    odd = b'{"not": "an array"}'
    merged = backlog.coalesce([(SOURCE, b"[]", 0), (SOURCE, payload(1, 2), 2), (SOURCE, odd, 1),
                               (SOURCE, payload(3, 1), 1)], max_trades=100)
    assert [count for _, _, count in merged] == [3, 1]
    assert merged[1][1] == odd
    assert [row[0] for row in orjson.loads(merged[0][1])] == [1, 2, 3]


def test_a_coalesced_payload_applies_exactly_the_trades_it_came_from(local):
    # Overlapping batches (a redelivery beside a backfill page): the apply keeps every id once.
    batches = [(SOURCE, payload(1, 50), 50), (SOURCE, payload(40, 30), 30), (SOURCE, payload(70, 1), 1)]
    (source, body, count), = backlog.coalesce(batches, max_trades=1000)
    assert count == 81
    applier = BatchApplier(local, retention_ms=10 ** 12)
    applied, skipped, floored = applier.apply(source, body)
    assert (applied, skipped, floored) == (70, 11, 0)
    assert [trade.id for trade in read_trades(local, SOURCE)] == list(range(1, 71))


def test_a_full_local_redis_drops_failover_copy_only_once_the_backlog_is_replayed(local):
    """The writer's last resort at the memory limit (processes/writer.py DROP_REPLAYED_COPY_SCRIPT):
    the oldest tenth of a source's failover copy goes only on the primary with an empty backlog."""
    from btcfeed.processes.writer import DROP_REPLAYED_COPY_SCRIPT
    drop = local.register_script(DROP_REPLAYED_COPY_SCRIPT)
    stream = keys.trades(SOURCE)
    for trade in trades(1, 100):
        local.xadd(stream, trade.fields())
    script_keys = [keys.WRITER_STATE, keys.BACKLOG, stream, keys.LOCAL_WINDOW_CUT]
    local.hset(keys.WRITER_STATE, "state", "failover")
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 0         # in failover: never
    local.hset(keys.WRITER_STATE, "state", "primary")
    append(local, [(SOURCE, payload(1, 3), 3)])
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 0         # a batch not yet replayed: never
    assert not local.exists(keys.LOCAL_WINDOW_CUT)                 # nothing dropped, no cut
    local.delete(keys.BACKLOG, keys.BACKLOG_TRADES)
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 10        # replayed: the oldest tenth
    assert local.xlen(stream) == 90
    (oldest_id, oldest), = local.xrange(stream, count=1)
    assert int(oldest[b"id"]) == 11
    # In the same step, the local copy is recorded as starting at the oldest entry left.
    assert int(local.hget(keys.LOCAL_WINDOW_CUT, SOURCE)) == int(oldest_id.split(b"-")[0])


def test_dropping_the_oldest_mirrored_records_where_the_local_copy_now_starts(local):
    """processes/writer.py DROP_OLDEST_MIRRORED_SCRIPT: the trim and the window cut health reports are
    one step; the cut never goes back, and an emptied mirror is cut at the server's time."""
    from btcfeed.processes.writer import DROP_OLDEST_MIRRORED_SCRIPT
    drop = local.register_script(DROP_OLDEST_MIRRORED_SCRIPT)
    mirror = keys.mirror(SOURCE)
    for second in range(1, 21):
        local.xadd(mirror, {"z": b"x"}, id=f"{second * 1000}-0")
    script_keys = [mirror, keys.LOCAL_WINDOW_CUT]
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 2
    assert local.hget(keys.LOCAL_WINDOW_CUT, SOURCE) == b"3000"
    local.hset(keys.LOCAL_WINDOW_CUT, SOURCE, 99_000)              # a later cut stands
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 2          # 18 -> 16
    assert local.hget(keys.LOCAL_WINDOW_CUT, SOURCE) == b"99000"
    before_ms = int(local.time()[0]) * 1000
    assert drop(keys=script_keys, args=[SOURCE, 0]) == 16          # everything: cut at the server's time
    assert int(local.hget(keys.LOCAL_WINDOW_CUT, SOURCE)) >= before_ms
    assert drop(keys=script_keys, args=[SOURCE, 0.9]) == 0
