"""Coinbase Exchange: the parser on real captured messages and hostile input, REST paging against the
simulator, and the whole stack against the simulator in coinbase mode with real faults."""

import json
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from btcfeed.exchanges import coinbase

from btcfeed import keys
from btcfeed.storage.bus import Bus
from btcfeed.config import ConfigError, Source, load
from btcfeed.exchanges.base import Heartbeat, iso_to_ms
from btcfeed.trade import BadMessage, MalformedJSON, Trade, decode_batch, parse_socket_read
from harness import (Simulator, assert_exact, primary_last_id, remove_stack, start_stack, wait_for,
                     wait_source_trades)
from tools.simulator import encode_message, stop_simulator
from btcfeed.processes.ingest import SourceFeed

LOCAL_CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "coinbase-exchange-feed.jsonl"
SHARED_CAPTURE = (Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "exchange-captures"
                  / "coinbase-exchange-feed.jsonl")
RATE = 1000
PRODUCT = "BTC-USD"
MATCH = {"type": "match", "trade_id": 881613, "maker_order_id": "a", "taker_order_id": "b", "side": "sell",
         "size": "0.04", "price": "14.7775", "product_id": PRODUCT, "sequence": 333938798,
         "time": "2021-04-17T16:43:30.244075Z"}


def raw(message: dict, **changes) -> bytes:
    return json.dumps({**message, **changes}).encode()


# --- the parser ---------------------------------------------------------------------------------

def capture_verdicts(path: Path):
    """(trades, ignored) of a capture, each message parsed for its own product."""
    trades, ignored = [], 0
    for line in path.read_bytes().splitlines():
        product = json.loads(line).get("product_id")
        item = coinbase.parse_ws(line, product, 1)
        if item is None:
            ignored += 1
        else:
            assert item.__class__ is Trade
            trades.append((product, item))
    return trades, ignored


@pytest.mark.parametrize("path", [LOCAL_CAPTURE, SHARED_CAPTURE], ids=["repository", "shared"])
def test_capture_matches_become_trades_and_nothing_else_does(path):
    if path is SHARED_CAPTURE and not path.exists():
        pytest.skip(f"no shared capture at {path}")
    trades, ignored = capture_verdicts(path)
    lines = [json.loads(line) for line in path.read_bytes().splitlines()]
    matches = [m for m in lines if m["type"] in ("match", "last_match")]
    assert len(trades) == len(matches) >= 41 and ignored == len(lines) - len(matches)
    for (product, trade), message in zip(trades, matches):
        assert (trade.id, trade.p, trade.q) == (message["trade_id"], message["price"], message["size"])
        assert product == message["product_id"]
        assert trade.side == {"sell": "buy", "buy": "sell"}[message["side"]]
    # Ids per product only go up in the capture: the sequencer sees no false gap from parsing.
    by_product = {}
    for product, trade in trades:
        by_product.setdefault(product, []).append(trade.id)
    assert all(ids == sorted(ids) for ids in by_product.values())


def test_match_fields_and_taker_side():
    trade = coinbase.parse_ws(raw(MATCH), PRODUCT, 77)
    assert trade == Trade(881613, "14.7775", "0.04", "buy", 1618677810244, 77)
    # Maker side "buy": a resting bid was hit, so the taker sold.
    assert coinbase.parse_ws(raw(MATCH, side="buy"), PRODUCT, 77).side == "sell"
    assert coinbase.parse_ws(raw(MATCH, type="last_match"), PRODUCT, 77).id == 881613


def test_time_to_ms_without_floats():
    assert iso_to_ms("t", "2021-04-17T16:43:30.244075Z") == 1618677810244
    assert iso_to_ms("t", "2021-04-17T16:43:30Z") == 1618677810000
    assert iso_to_ms("t", "2021-04-17T16:43:30.9999999Z") == 1618677810999
    assert iso_to_ms("t", "2021-04-17T16:43:30.5+00:00") == 1618677810500


def test_heartbeat_carries_last_trade_id():
    beat = {"type": "heartbeat", "sequence": 90, "last_trade_id": 1234, "product_id": PRODUCT,
            "time": "2021-04-17T16:43:30.244075Z"}
    assert coinbase.parse_ws(raw(beat), PRODUCT, 1) == Heartbeat(1234)
    with pytest.raises(BadMessage):
        coinbase.parse_ws(raw(beat, product_id="ETH-USD"), PRODUCT, 1)
    with pytest.raises(BadMessage):
        coinbase.parse_ws(raw(beat, last_trade_id="1234"), PRODUCT, 1)


@pytest.mark.parametrize("message", [
    raw(MATCH, product_id="ETH-USD"),                       # wrong product
    raw(MATCH, price="abc"),                                # bad price
    raw(MATCH, price="NaN"),
    raw(MATCH, price="1e3"),                                # exponent
    raw(MATCH, price="-14.7"),                              # negative
    raw(MATCH, price="0.0000"),                             # zero
    raw(MATCH, price=14.7775),                              # a number, not the exchange's string
    raw(MATCH, size="0.000000001"),                         # finer than 1e-8
    raw(MATCH, size="99999999"),                            # implausible quantity
    raw(MATCH, trade_id=-5),
    raw(MATCH, trade_id="881613"),
    raw(MATCH, trade_id=2 ** 60),
    raw(MATCH, side="up"),
    raw(MATCH, time="yesterday"),
    raw(MATCH, time="2021-13-17T16:43:30Z"),
    b'{"type":"match","trade_id":',                         # cut in half
    b'{"type":"error","message":"Failed to subscribe","reason":"BTC-XYZ is not a valid product"}',
    b'{"hello":"world"}',
    b'[1,2,3]',
    b'\xff\xfe',
    b'{"type":["match"]}',
], ids=lambda m: m[:60].decode("utf-8", "replace"))
def test_hostile_messages_never_become_trades(message):
    with pytest.raises(BadMessage):
        coinbase.parse_ws(message, PRODUCT, 1)


def rest_row(trade_id, price="100.00", size="0.10000000", side="sell"):
    return {"time": "2021-04-17T16:43:30.244075Z", "trade_id": trade_id, "price": price, "size": size,
            "side": side}


def test_rest_page_is_newest_first_and_comes_back_ascending():
    trades = coinbase.parse_rest_page([rest_row(12), rest_row(11), rest_row(10)], 5)
    assert [t.id for t in trades] == [10, 11, 12]


@pytest.mark.parametrize("body", [
    [rest_row(10), rest_row(11)],                          # ascending: not what the API sends
    [rest_row(11), rest_row(11)],                          # repeated id
    [rest_row(11), rest_row(10, price="NaN")],
    {"message": "NotFound"},
    [["not", "an", "object"]],
])
def test_hostile_rest_pages_are_refused_whole(body):
    with pytest.raises(BadMessage):
        coinbase.parse_rest_page(body, 5)


def test_subscribe_message_asks_for_matches_and_heartbeats():
    assert json.loads(coinbase.subscribe_message(PRODUCT)) == {
        "type": "subscribe", "product_ids": [PRODUCT], "channels": ["matches", "heartbeat"]}


# --- configuration ------------------------------------------------------------------------------

def test_coinbase_source_and_urls_configure():
    config = load({"BTCFEED_SOURCES": "coinbase:btc-usd", "BTCFEED_COINBASE_WS_URL": "ws://127.0.0.1:1",
                   "BTCFEED_COINBASE_REST_URL": "http://127.0.0.1:1"})
    assert config.sources[0].name == "coinbase:BTC-USD"
    assert (config.coinbase_ws_url, config.coinbase_rest_url) == ("ws://127.0.0.1:1", "http://127.0.0.1:1")
    defaults = load({})
    assert defaults.coinbase_ws_url == "wss://ws-feed.exchange.coinbase.com"
    assert defaults.coinbase_rest_url == "https://api.exchange.coinbase.com"


@pytest.mark.parametrize("variable, value, needle", [
    ("BTCFEED_COINBASE_WS_URL", "https://ws-feed.exchange.coinbase.com", "is not a ws:// or wss:// base URL"),
    ("BTCFEED_COINBASE_REST_URL", "https://api.exchange.coinbase.com/products", "without a path"),
    ("BTCFEED_SOURCES", "coinbase:BTCUSD", "is not a Coinbase product like BTC-USD"),
])
def test_bad_coinbase_settings_are_one_readable_line(variable, value, needle):
    with pytest.raises(ConfigError) as info:
        load({variable: value})
    assert str(info.value).startswith(variable) and needle in str(info.value) and "\n" not in str(info.value)


# --- REST paging against the simulator ----------------------------------------------------------

@pytest.mark.integration
def test_rest_pages_forward_from_any_id_and_cursor_headers():
    sim = Simulator(rate=5000, mode="coinbase")
    try:
        wait_for(lambda: sim.client.status()["last_id"] >= sim.client.status()["first_id"] + 2500,
                 10, "trades")
        sim.client.pause()
        status = sim.client.status()
        adapter = coinbase.CoinbaseAdapter(PRODUCT, "ws://unused", f"http://127.0.0.1:{sim.port}")
        from_id, got = status["first_id"] + 17, []
        while True:
            page, exhausted = adapter.fetch_page(from_id)
            got += page
            if exhausted:
                break
            from_id = page[-1].id + 1
        assert [t.id for t in got] == list(range(status["first_id"] + 17, status["last_id"] + 1))
        history = sim.client.history(got[0].id, got[-1].id)
        assert [(t.id, t.p, t.q, t.ts) for t in got] == [(r[0], r[1], r[2], r[3]) for r in history]
        with urllib.request.urlopen(f"http://127.0.0.1:{sim.port}/products/{PRODUCT}/trades?before="
                                    f"{status['first_id'] + 9}&limit=5") as response:
            body = json.loads(response.read())
            first = status["first_id"]
            assert [row["trade_id"] for row in body] == list(range(first + 14, first + 9, -1))
            assert response.headers["CB-BEFORE"] == str(status["first_id"] + 14)
            assert response.headers["CB-AFTER"] == str(status["first_id"] + 10)
    finally:
        stop_simulator(sim.process)


# --- the whole stack ----------------------------------------------------------------------------

@pytest.fixture
def coinbase_sim():
    simulator = Simulator(rate=RATE, mode="coinbase")
    yield simulator
    simulator.stop()




@pytest.mark.integration
@pytest.mark.parametrize("fault", ["drop", "cut", "fragment", "stall", "rest429", "garbage"])
def test_fault_through_the_stack_every_trade_exactly_once(primary, primary_client, coinbase_sim, fault):
    stack = start_stack(primary, coinbase_sim)
    try:
        wait_source_trades(primary_client, coinbase_sim, RATE)
        control = coinbase_sim.client
        if fault == "stall":
            control.fault("stall", seconds=2)
            time.sleep(2.5)
        elif fault == "fragment":
            control.fault("fragment", on=1)
            time.sleep(1.5)
            control.fault("fragment", on=0)
        elif fault == "rest429":
            control.fault("rest429", count=3)       # the backfill after the drop meets a 429 storm
            control.fault("drop")
            time.sleep(1.0)
        else:
            control.fault(fault)
            time.sleep(1.0)
        wait_source_trades(primary_client, coinbase_sim, RATE)
        verdict = assert_exact(primary_client, coinbase_sim)
        assert verdict.expected >= 2 * RATE
        log = open(stack.log_path("ingest")).read()
        expected = {"drop": "event=connection_lost", "cut": "event=connection_lost", "stall": "event=gap",
                    "rest429": "event=rest_rate_limited", "garbage": "event=message_rejected",
                    "fragment": "event=connected"}[fault]
        assert expected in log
        if fault in ("drop", "cut", "stall", "rest429"):
            assert "event=backfilled" in log
    finally:
        remove_stack(stack)


@pytest.mark.integration
def test_heartbeat_reveals_trades_missed_in_a_quiet_market(primary, primary_client, coinbase_sim):
    """Trades missed during a stall, then silence: only the heartbeat's last_trade_id shows the gap."""
    stack = start_stack(primary, coinbase_sim)
    try:
        wait_source_trades(primary_client, coinbase_sim, RATE // 2)
        coinbase_sim.client.fault("stall", seconds=1.5)
        time.sleep(0.5)
        coinbase_sim.client.pause()                  # nothing new after the stall: no trade shows the gap
        last_id = coinbase_sim.client.status()["last_id"]
        wait_for(lambda: primary_last_id(primary_client, coinbase_sim.source) >= last_id, 15,
                 "the heartbeat-driven backfill to reach the exchange's last trade")
        assert "seen_in=heartbeat" in open(stack.log_path("ingest")).read()
        assert_exact(primary_client, coinbase_sim)
    finally:
        remove_stack(stack)


# --- the sequencer with this exchange's messages (no network; the real bus scripts) ---------------

class SilentLog:
    def __getattr__(self, name):
        return lambda *args, **fields: None


@pytest.fixture
def bus(redis_server):
    client = redis_server.client()
    return Bus(client, max_entries=1000, deadletter_max=100)


def live_feed(bus):
    return SourceFeed(Source("coinbase", PRODUCT), load({}), bus, SilentLog(), threading.Event())


def bus_ids(bus) -> list:
    return [t.id for _, fields in bus.client.xrange(keys.BUS) for t in decode_batch(fields[b"t"])]


def test_backwards_and_repeated_live_ids_never_publish_a_trade_twice(bus):
    feed = live_feed(bus)
    for trade_id in (5, 6, 6, 4, 7, 5, 8):
        item = feed.parse_frame(0x1, raw(MATCH, trade_id=trade_id))
        feed.handle("trades", None, [item], 0.0)
    feed.parse_frame(0x1, raw(MATCH, trade_id=9, price="NaN"))
    feed.flush()
    assert bus_ids(bus) == [5, 6, 7, 8]
    assert feed.counts["duplicates"] == 3 and feed.counts["deadlettered"] == 1
    assert bus.client.xlen(keys.DEADLETTER) == 1


def test_heartbeat_ahead_of_the_stream_records_a_gap_the_backfill_fills_up_to_its_id(bus):
    feed = live_feed(bus)
    asked = []

    def fetch_page(from_id, after_ts_ms=None):
        asked.append(from_id)
        return [Trade(i, "1.00", "0.10000000", "buy", 1, 1) for i in range(from_id, 13)], True

    feed.adapter.fetch_page = fetch_page
    feed.adapter.rest_pause_s = lambda: 0.0
    feed.handle("trades", None, [feed.parse_frame(0x1, raw(MATCH, trade_id=7))], 0.0)
    feed.handle("heartbeat", None, 12, 0.0)
    feed.handle("heartbeat", None, 12, 0.0)          # nothing new: no second gap
    assert {f: (g.first, g.last) for f, g in bus.gaps(feed.source).items()} == {"8": (8, 12)}
    feed.backfiller.fill_one_page(bus.gaps(feed.source)["8"])
    assert bus_ids(bus) == [7, 8, 9, 10, 11, 12] and bus.gaps(feed.source) == {}
    assert asked == [8] and feed.counts["gaps"] == 1 and feed.counts["backfilled"] == 5
    feed.handle("trades", None, [feed.parse_frame(0x1, raw(MATCH, trade_id=13))], 0.0)
    feed.flush()
    assert bus_ids(bus)[-1] == 13 and bus.gaps(feed.source) == {}


# --- the reassembler hooks: a match cut by a lost connection ------------------------------------

def capture_match() -> bytes:
    """The first match of the recorded feed (SKL-BTC), as the exchange sent it."""
    lines = LOCAL_CAPTURE.read_bytes().splitlines()
    return next(line for line in lines if line.startswith(b'{"type":"match"'))


def cut_match(message: bytes, keep: int, product: str = "SKL-BTC"):
    """One frame holding message, received up to its byte keep, then the connection is lost:
    (the adapter's cut record id, the sample, the reassembler's recovered count)."""
    adapter = coinbase.CoinbaseAdapter(product)
    reassembler = adapter.make_reassembler(1 << 20)
    frame = encode_message(message)
    assert reassembler.feed(frame[:len(frame) - len(message) + keep]) == []
    sample = reassembler.connection_lost()
    return adapter.cut_record_id(sample), sample, reassembler.recovered


def test_match_cut_after_its_trade_id_is_sampled_but_needs_its_product():
    message = capture_match()
    after_id = message.index(b'"trade_id":280232,') + len(b'"trade_id":280232,')
    record_id, sample, recovered = cut_match(message, after_id)
    # The id is read (and counted as recovered), but product_id comes later in a match: until it
    # has arrived the match could be any product's, so it names no record.
    assert sample == {"type": "match", "trade_id": 280232} and recovered == 1
    assert record_id is None


def test_match_cut_after_its_product_names_its_trade_id():
    message = capture_match()
    keep = message.index(b'"sequence"')
    assert cut_match(message, keep)[0] == 280232
    assert cut_match(message, keep, product="BTC-USD")[0] is None, "another product's match"
    last_match = message.replace(b'"type":"match"', b'"type":"last_match"')
    assert cut_match(last_match, keep + 5)[0] == 280232


def test_cut_heartbeat_or_cut_inside_the_id_names_nothing():
    beat = (b'{"type":"heartbeat","sequence":90,"last_trade_id":1234,"product_id":"SKL-BTC",'
            b'"time":"2021-04-17T16:43:30.244075Z"}')
    record_id, _, recovered = cut_match(beat, len(beat) - 3)
    assert (record_id, recovered) == (None, 0)
    message = capture_match()
    inside_id = message.index(b'280232') + 4
    assert cut_match(message, inside_id)[0] is None


def test_cut_record_id_refuses_what_is_not_a_usable_id():
    assert coinbase.cut_record_id(None, PRODUCT) is None
    assert coinbase.cut_record_id({"type": "match", "product_id": PRODUCT}, PRODUCT) is None
    match = {"type": "match", "product_id": PRODUCT}
    assert coinbase.cut_record_id({**match, "trade_id": 2 ** 53}, PRODUCT) is None
    assert coinbase.cut_record_id({**match, "type": "ticker", "trade_id": 5}, PRODUCT) is None
    assert coinbase.cut_record_id({**match, "trade_id": 5}, PRODUCT) == 5


def test_two_matches_in_one_message_are_malformed_json_then_split():
    first = raw(MATCH)
    second = raw(MATCH, trade_id=881614)
    with pytest.raises(MalformedJSON):
        coinbase.parse_ws(first + second, PRODUCT, 1)
    adapter = coinbase.CoinbaseAdapter(PRODUCT)
    results, rejects, _ = parse_socket_read(adapter.make_reassembler(1 << 20), encode_message(first + second),
                                            adapter.parse, 1)
    assert [trade.id for trade in results] == [881613, 881614] and rejects == []
