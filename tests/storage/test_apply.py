"""The apply script against a real redis-server: exactly-once, order-insensitive, never backwards."""

import json
import random
import time

import pytest
import redis

from btcfeed import keys
from btcfeed.storage.antientropy import ids_of
from btcfeed.storage.apply import (BatchApplier, expected_candles, is_epoch_error, iso_time, read_candles,
                                   read_trades)
from btcfeed.trade import Trade, encode_batch
from samples import make_trades, this_minute

SOURCE = "binance:BTCUSDT"
HOUR = 3600 * 1000


@pytest.fixture
def applier(redis_client):
    return BatchApplier(redis_client, retention_ms=24 * HOUR, compat_source=SOURCE)


def test_each_trade_applied_once_however_often_it_is_sent(redis_client, applier):
    trades = make_trades(5000, 3000)
    assert applier.apply_trades(SOURCE, trades[:2000]) == [2000, 0, 0]
    assert applier.apply_trades(SOURCE, trades[1000:]) == [1000, 1000, 0]
    assert applier.apply_trades(SOURCE, trades) == [0, 3000, 0]
    stored = read_trades(redis_client, SOURCE)
    assert [t.id for t in stored] == [t.id for t in trades]
    assert stored == trades


def test_shuffled_replays_converge_to_the_same_candles_and_last(redis_client, applier):
    trades = make_trades(65_000, 4000, seed=7)   # crosses a seen-set segment boundary (65536)
    shuffled = trades[:]
    random.Random(3).shuffle(shuffled)
    for start in range(0, len(shuffled), 333):
        applier.apply_trades(SOURCE, shuffled[start:start + 333])
        applier.apply_trades(SOURCE, shuffled[max(0, start - 100):start + 50])   # overlapping retries
    assert sorted(t.id for t in read_trades(redis_client, SOURCE)) == [t.id for t in trades]
    expected = expected_candles(trades)
    stored = read_candles(redis_client, SOURCE)
    assert stored.keys() == expected.keys()
    for minute, candle in expected.items():
        assert stored[minute] == candle
    assert redis_client.hgetall(keys.last(SOURCE)) == trades[-1].fields() | {"id": str(trades[-1].id)}


def test_last_hash_and_compat_keys_never_go_backwards(redis_client, applier):
    trades = make_trades(100, 50)
    applier.apply_trades(SOURCE, trades[40:])
    applier.apply_trades(SOURCE, trades[:40])   # an older backlog replayed after newer live trades
    newest = trades[-1]
    assert redis_client.hget(keys.last(SOURCE), "id") == str(newest.id)
    assert redis_client.get(keys.COMPAT_LAST_PRICE) == newest.p
    assert redis_client.get(keys.COMPAT_LAST_UPDATE) == iso_time(newest.ts)
    history = [json.loads(x) for x in redis_client.lrange(keys.COMPAT_HISTORY, 0, -1)]
    assert len(history) == 1 and history[0]["timestamp"] == iso_time(newest.ts)
    assert history[0]["price"] == float(newest.p) and history[0]["volume"] == float(newest.q)


def test_compat_history_is_capped(redis_client):
    applier = BatchApplier(redis_client, retention_ms=HOUR, compat_source=SOURCE, compat_history_len=5)
    for trade in make_trades(1, 12):
        applier.apply_trades(SOURCE, [trade])
    assert redis_client.llen(keys.COMPAT_HISTORY) == 5


def test_compat_keys_untouched_for_other_sources(redis_client, applier):
    applier.apply_trades("binance:ETHBTC", make_trades(1, 3))
    assert redis_client.get(keys.COMPAT_LAST_PRICE) is None
    assert redis_client.xlen(keys.trades("binance:ETHBTC")) == 3


def test_live_channel_carries_only_newly_applied_trades(redis_server, redis_client, applier):
    listener = redis_server.client(decode_responses=True).pubsub()
    listener.subscribe(keys.live_channel(SOURCE))
    assert listener.get_message(timeout=1)["type"] == "subscribe"
    trades = make_trades(1, 5)
    applier.apply_trades(SOURCE, trades[:3])
    applier.apply_trades(SOURCE, trades)
    received = []
    while (message := listener.get_message(timeout=0.5)) is not None:
        received.append(json.loads(message["data"]))
    assert [m["id"] for m in received] == [1, 2, 3, 4, 5]
    assert received[0] == {"id": 1, "p": trades[0].p, "q": trades[0].q, "side": trades[0].side,
                           "ts": trades[0].ts, "rts": trades[0].rts}
    listener.close()


def test_retention_trims_the_stream_by_the_servers_clock(redis_client):
    # The stream is trimmed by entry id, which is the server's clock at write time.
    applier = BatchApplier(redis_client, retention_ms=1000, compat_source=None)
    now = this_minute()
    old = make_trades(1, 2000, start_ts=now)
    applier.apply_trades(SOURCE, old)
    time.sleep(1.2)
    applier.apply_trades(SOURCE, make_trades(5000, 10, start_ts=now))
    # Approximate trimming (MINID ~) may keep one partly-filled node of old entries (100 at most).
    assert redis_client.xlen(keys.trades(SOURCE)) <= 110
    assert read_trades(redis_client, SOURCE)[-1].id == 5009
    assert redis_client.ttl(keys.seen_segment(SOURCE, 1)) == -1      # seen bits never expire ...
    assert applier.apply_trades(SOURCE, old[:10]) == [0, 10, 0]       # ... trimmed, still known as seen


def test_a_writer_clock_far_ahead_trims_nothing(redis_client, monkeypatch):
    applier = BatchApplier(redis_client, retention_ms=5 * 60_000, compat_source=None)
    applier.apply_trades(SOURCE, make_trades(1, 500))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 600)      # this host's clock 10 minutes ahead
    applier.apply_trades(SOURCE, make_trades(501, 500))
    assert [t.id for t in read_trades(redis_client, SOURCE)] == list(range(1, 1001))


def test_ids_below_the_floor_are_counted_and_never_applied_again(redis_client):
    # Trades printed 10 minutes ago, with a 1-minute window: their minute leaves the candle index at
    # once, and the floor moves past their highest id; the whole seen segment below it is deleted.
    applier = BatchApplier(redis_client, retention_ms=60_000, compat_source=None)
    old = make_trades(65_000, 536, start_ts=int(time.time() * 1000) - 600_000)
    assert applier.apply_trades(SOURCE, old) == [536, 0, 0]
    assert int(redis_client.hget(keys.meta(SOURCE), "floor")) == 65_536
    assert not redis_client.exists(keys.seen_segment(SOURCE, 65_000))
    # A copy of them from long ago (a restored state dir, a host that was away for days): skipped.
    assert applier.apply_trades(SOURCE, old) == [0, 0, 536]
    fresh = make_trades(70_000, 10, start_ts=this_minute())
    assert applier.apply_trades(SOURCE, old[:5] + fresh) == [10, 0, 5]
    assert redis_client.xlen(keys.trades(SOURCE)) == 546


def test_the_seen_set_holds_exactly_the_applied_ids_bit_for_bit(redis_server, applier):
    # Sparse ids over three segments, at both ends of a segment, in overlapping and shuffled batches:
    # every applied id's bit is set, no other bit is, and what lies before a segment's first changed
    # byte (an earlier batch's bits) survives a later write.
    rng = random.Random(11)
    ids = sorted(set(rng.sample(range(65_536, 4 * 65_536), 5000)) | {65_536, 131_071, 131_072, 262_143})
    now = int(time.time() * 1000)
    trades = [Trade(i, "60000.10", "0.002", "sell", now, now) for i in ids]
    rng.shuffle(trades)
    applied = 0
    for first in range(0, len(trades), 700):
        applied += applier.apply_trades(SOURCE, trades[max(0, first - 100):first + 700])[0]
    assert applied == len(ids)
    raw = redis_server.client()
    for number in {i >> keys.SEEN_SEGMENT_BITS for i in ids}:
        held = raw.get(keys.seen_prefix(SOURCE) + str(number))
        # ids_of reads Redis bit order (offset 0 = the first byte's high bit, as SETBIT).
        assert ids_of(number, held) == [i for i in ids if i >> keys.SEEN_SEGMENT_BITS == number], number
    assert applier.apply_trades(SOURCE, trades) == [0, len(ids), 0]


def test_a_wrong_type_key_stops_the_batch_before_its_first_write(redis_client, applier):
    trades = make_trades(1, 2000)           # 74 s of trades: more than one minute
    applier.apply_trades(SOURCE, trades[:100])
    # Somebody else wrote a string where the next minute's candle hash goes.
    later_minute = trades[-1].ts // 60000 * 60000
    assert later_minute != trades[99].ts // 60000 * 60000
    redis_client.set(keys.candle(SOURCE, later_minute), "not a hash")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        applier.apply_trades(SOURCE, trades)
    assert redis_client.xlen(keys.trades(SOURCE)) == 100
    assert not redis_client.getbit(keys.seen_segment(SOURCE, 150), 150)
    redis_client.delete(keys.candle(SOURCE, later_minute))
    assert applier.apply_trades(SOURCE, trades) == [1900, 100, 0]
    assert read_candles(redis_client, SOURCE) == expected_candles(trades)


def test_a_primary_without_the_expected_epoch_refuses_before_any_write(redis_client):
    epochs = {SOURCE: "e1"}
    applier = BatchApplier(redis_client, retention_ms=24 * HOUR, compat_source=SOURCE, epochs=epochs)
    with pytest.raises(redis.ResponseError) as refused:
        applier.apply_trades(SOURCE, make_trades(1, 10))
    assert is_epoch_error(refused.value)
    assert redis_client.keys("*") == []
    redis_client.hset(keys.meta(SOURCE), "epoch", "e1")
    assert applier.apply_trades(SOURCE, make_trades(1, 10)) == [10, 0, 0]
    redis_client.flushall()                                   # silent loss: the next write says so
    with pytest.raises(redis.ResponseError) as refused:
        applier.apply_many([(SOURCE, encode_batch(make_trades(11, 10)))])
    assert is_epoch_error(refused.value)
    assert redis_client.keys("*") == []


def test_compat_history_is_json_even_for_leading_zero_decimals(redis_client, applier):
    trade = make_trades(1, 1)[0]
    applier.apply_trades(SOURCE, [Trade(1, "0042000.10", "00.5", "buy", trade.ts, trade.rts)])
    entry = json.loads(redis_client.lrange(keys.COMPAT_HISTORY, -1, -1)[0])
    assert entry["price"] == 42000.1 and entry["volume"] == 0.5
    assert redis_client.get(keys.COMPAT_LAST_PRICE) == "0042000.10"     # the exchange's string, unchanged


def test_script_reloads_after_script_flush(redis_client, applier):
    applier.apply_trades(SOURCE, make_trades(1, 2))
    redis_client.script_flush()
    assert applier.apply_trades(SOURCE, make_trades(3, 2)) == [2, 0, 0]


def test_bus_trim_never_removes_a_pending_entry(redis_client):
    from btcfeed.processes.writer import TRIM_BUS_SCRIPT, _next_id
    bus = keys.BUS
    redis_client.xgroup_create(bus, keys.BUS_GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(bus, {"n": i}) for i in range(300)]
    redis_client.xreadgroup(keys.BUS_GROUP, "writer", {bus: ">"}, count=300)
    stranded = ids[50]
    redis_client.xack(bus, keys.BUS_GROUP, *[i for i in ids if i != stranded])
    redis_client.eval(TRIM_BUS_SCRIPT, 1, bus, keys.BUS_GROUP, _next_id(ids[-1].encode()))
    assert redis_client.xrange(bus, min=stranded, max=stranded)        # still there to be re-read
    assert redis_client.xlen(bus) >= 250
    redis_client.xack(bus, keys.BUS_GROUP, stranded)
    redis_client.eval(TRIM_BUS_SCRIPT, 1, bus, keys.BUS_GROUP, _next_id(ids[-1].encode()))
    assert redis_client.xlen(bus) < 100                                # approximate trim: whole nodes


def test_one_source_refused_leaves_the_other_applied_in_the_same_pipeline(redis_client):
    from btcfeed.storage.apply import is_source_refusal
    applier = BatchApplier(redis_client, retention_ms=24 * HOUR)
    other = "coinbase:BTC-USD"
    trades = make_trades(1, 10)
    redis_client.set(keys.last(SOURCE), "somebody else's string")
    results = applier.apply_many([(SOURCE, encode_batch(trades)), (other, encode_batch(trades))],
                                 raise_on_error=False)
    assert isinstance(results[0], redis.ResponseError) and is_source_refusal(results[0])
    assert results[1] == [10, 0, 0]
    assert redis_client.xlen(keys.trades(SOURCE)) == 0 and redis_client.xlen(keys.trades(other)) == 10
    assert not is_source_refusal(redis.ConnectionError("refused"))
    assert not is_source_refusal(redis.ResponseError("BTCFEED-EPOCH the primary holds epoch none"))
