"""Kraken: the v2 parser (JSON-number prices read exactly), the v1 capture, REST paging by time against
the simulator, and the whole stack against the simulator in kraken mode with real faults."""

import json
import time
from pathlib import Path

import pytest

from btcfeed import keys

from btcfeed.exchanges import kraken
from btcfeed.config import ConfigError, load
from btcfeed.exchanges.base import Heartbeat, RateLimited, RestError
from btcfeed.trade import BadMessage, MalformedJSON, Trade, parse_socket_read
from harness import Simulator, assert_exact, remove_stack, start_stack, wait_for, wait_source_trades
from tools.simulator import encode_message, stop_simulator

LOCAL_CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "kraken-v1-trade.jsonl"
SHARED_CAPTURE = (Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "exchange-captures"
                  / "kraken-v1-trade.jsonl")
RATE = 500
SYMBOL = "BTC/USD"
ITEM = ('{"symbol":"BTC/USD","side":"sell","price":%s,"qty":%s,"ord_type":"market","trade_id":%s,'
        '"timestamp":"2023-09-25T07:49:37.708706Z"}')


def update(*items) -> bytes:
    return ('{"channel":"trade","type":"update","data":[%s]}' % ",".join(items)).encode()


def item(price="41000.1", qty="0.0012", trade_id="12345", **replace) -> str:
    text = ITEM % (price, qty, trade_id)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text


# --- the v2 parser ------------------------------------------------------------------------------

def test_update_becomes_trades_with_exact_decimal_strings():
    trades = kraken.parse_ws(update(item("41000.10", "0.00120000", "7"), item("0.1", "3", "8")), SYMBOL, 9)
    assert trades == [Trade(7, "41000.1", "0.0012", "sell", 1695628177708, 9),
                      Trade(8, "0.1", "3", "sell", 1695628177708, 9)]


def test_numbers_that_a_float_would_round_stay_exact():
    # 0.1 + 0.2 style: these digits do not survive a round trip through a double.
    price, qty = "12345678901.12345678", "1234567.12345678"
    (trade,) = kraken.parse_ws(update(item(price, qty)), SYMBOL, 1)
    assert (trade.p, trade.q) == (price, qty)
    assert str(float(price)) != price


def test_the_same_trade_reads_the_same_over_websocket_and_rest():
    (live,) = kraken.parse_ws(update(item("30243.4", "0.3450767", "61044952")), SYMBOL, 1)
    rest = kraken.trade_from_rest_row(["30243.40000", "0.34507670", kraken.RawNumber("1695628177.7087069"),
                                       "s", "m", "", kraken.RawNumber("61044952")], 1)
    assert (live.id, live.p, live.q, live.side, live.ts) == (rest.id, rest.p, rest.q, rest.side, rest.ts)


def test_heartbeat_status_and_acks_are_not_trades():
    assert kraken.parse_ws(b'{"channel":"heartbeat"}', SYMBOL, 1) == Heartbeat(None)
    status = b'{"channel":"status","type":"update","data":[{"system":"online"}]}'
    assert kraken.parse_ws(status, SYMBOL, 1) is None
    ack = b'{"method":"subscribe","result":{"channel":"trade"},"success":true}'
    assert kraken.parse_ws(ack, SYMBOL, 1) is None
    assert kraken.parse_ws(b'{"channel":"trade","type":"update","data":[]}', SYMBOL, 1) is None


@pytest.mark.parametrize("message", [
    # a wrong pair in a batch
    update(item(trade_id="5"), item(trade_id="6").replace('"BTC/USD"', '"ETH/USD"')),
    update(item(price='"41000.1"')),                       # a string where Kraken v2 sends a number
    update(item(price="NaN")),
    update(item(price="Infinity")),
    update(item(price="4.1e4")),                           # exponent
    update(item(price="4.1E+4")),
    update(item(price="-41000.1")),                        # negative
    update(item(price="0.0")),                             # zero
    update(item(qty="0.000000001")),                       # finer than 1e-8
    update(item(qty="123456789")),                         # implausible quantity
    update(item(trade_id="-1")),
    update(item(trade_id="1.5")),
    update(item(trade_id='"12345"')),
    update(item(trade_id="9007199254740993")),             # beyond what stays exact downstream
    update(item(trade_id="5"), item(trade_id="4")),        # ids backwards within a message
    update(item(trade_id="5"), item(trade_id="5")),        # ids repeating
    update(item().replace('"sell"', '"up"')),
    update(item().replace("2023-09-25T07:49:37.708706Z", "soon")),
    b'{"channel":"trade","type":"update","data":[{"symbol":',
    b'{"channel":"trade","type":"bogus","data":[]}',
    b'{"method":"subscribe","success":false,"error":"Currency pair not supported"}',
    b'[993,[["354.11","0.89","1618678142.557535","s","l",""]],"trade","XMR/USD"]',   # v1 on a v2 socket
    b'{"hello":"world"}',
    b'\xff\xfe',
], ids=lambda m: m[:70].decode("utf-8", "replace"))
def test_hostile_messages_never_become_trades(message):
    with pytest.raises(BadMessage):
        kraken.parse_ws(message, SYMBOL, 1)


# --- the v1 capture (no trade ids, so never a live source) --------------------------------------

@pytest.mark.parametrize("path", [LOCAL_CAPTURE, SHARED_CAPTURE], ids=["repository", "shared"])
def test_v1_capture_trades_parse_and_events_are_ignored(path):
    if path is SHARED_CAPTURE and not path.exists():
        pytest.skip(f"no shared capture at {path}")
    trades, ignored, rows = [], 0, 0
    for line in path.read_bytes().splitlines():
        message = json.loads(line)
        pair = message[3] if isinstance(message, list) else None
        parsed = kraken.parse_v1(line, pair)
        if parsed is None:
            ignored += 1
        else:
            trades += parsed
            rows += len(message[1])
            for got, row in zip(parsed, message[1]):
                assert got.p == kraken.normalized_decimal(row[0])
                assert got.q == kraken.normalized_decimal(row[1])
                assert got.side == {"b": "buy", "s": "sell"}[row[3]]
    assert len(trades) == rows >= 10 and ignored >= 40
    assert trades[0] == kraken.V1Trade("354.11", "0.89594024", "sell", 1618678142557)
    with pytest.raises(BadMessage):
        kraken.parse_v1(b'[993,[["354.11","0.8","1618678142.5","s","l",""]],"trade","XMR/USD"]', "XBT/USD")


# --- REST -----------------------------------------------------------------------------------------

def rest_body(rows, last="1688671969993150842", error=()):
    return kraken.loads_exact(json.dumps({"error": list(error), "result": {"XXBTZUSD": rows, "last": last}}))


def test_rest_answer_rows_and_cursor():
    rows = [["30243.40000", "0.34507674", 1688669597.8277369, "b", "m", "", 61044952],
            ["30243.30000", "0.00376960", 1688669598.2804112, "s", "l", "", 61044953]]
    page = kraken.parse_rest_answer(rest_body(rows), 4)
    assert page.trades == [Trade(61044952, "30243.4", "0.34507674", "buy", 1688669597827, 4),
                           Trade(61044953, "30243.3", "0.0037696", "sell", 1688669598280, 4)]
    assert page.last_ns == 1688671969993150842 and page.rows == 2


def test_rest_rate_limit_and_errors():
    with pytest.raises(RateLimited):
        kraken.parse_rest_answer(kraken.loads_exact('{"error":["EGeneral:Too many requests"]}'), 1)
    with pytest.raises(RestError):
        kraken.parse_rest_answer(kraken.loads_exact('{"error":["EQuery:Unknown asset pair"]}'), 1)


@pytest.mark.parametrize("rows", [
    # backwards, then repeated
    [["1.0", "1.0", 1688669597.1, "b", "m", "", 6], ["1.0", "1.0", 1688669597.2, "b", "m", "", 5]],
    [["1.0", "1.0", 1688669597.1, "b", "m", "", 6], ["1.0", "1.0", 1688669597.2, "b", "m", "", 6]],
    [["NaN", "1.0", 1688669597.1, "b", "m", "", 6]],
    [["1e5", "1.0", 1688669597.1, "b", "m", "", 6]],
    [["1.0", "1.0", 1688669597.1, "x", "m", "", 6]],
    [["1.0", "1.0", 1688669597.1, "b", "m", ""]],                      # no id
])
def test_hostile_rest_pages_are_refused_whole(rows):
    with pytest.raises(BadMessage):
        kraken.parse_rest_answer(rest_body(rows), 1)


def test_rest_pair_name():
    assert kraken.rest_pair("BTC/USD") == "XBTUSD" and kraken.rest_pair("ETH/BTC") == "ETHXBT"


# --- configuration ------------------------------------------------------------------------------

def test_kraken_source_and_urls_configure():
    config = load({"BTCFEED_SOURCES": "kraken:btc/usd", "BTCFEED_KRAKEN_WS_URL": "ws://127.0.0.1:1/v2",
                   "BTCFEED_KRAKEN_REST_URL": "http://127.0.0.1:1"})
    assert config.sources[0].name == "kraken:BTC/USD"
    assert keys.trades(config.sources[0].name) == "btcfeed:{kraken:BTC/USD}:trades"
    assert config.kraken_ws_url == "ws://127.0.0.1:1/v2"
    defaults = load({})
    assert (defaults.kraken_ws_url, defaults.kraken_rest_url) == ("wss://ws.kraken.com/v2",
                                                                  "https://api.kraken.com")


@pytest.mark.parametrize("variable, value, needle", [
    ("BTCFEED_KRAKEN_WS_URL", "https://ws.kraken.com/v2", "is not a ws:// or wss:// base URL"),
    ("BTCFEED_KRAKEN_REST_URL", "https://api.kraken.com/0/public", "without a path"),
    ("BTCFEED_KRAKEN_REST_URL", "ftp://api.kraken.com", "is not a http:// or https:// base URL"),
    ("BTCFEED_SOURCES", "kraken:XBTUSD", "is not a Kraken v2 symbol like BTC/USD"),
])
def test_bad_kraken_settings_are_one_readable_line(variable, value, needle):
    with pytest.raises(ConfigError) as info:
        load({variable: value})
    assert str(info.value).startswith(variable) and needle in str(info.value) and "\n" not in str(info.value)


# --- REST paging against the simulator ------------------------------------------------------------

@pytest.mark.integration
def test_rest_pages_by_time_from_any_id_with_or_without_its_time():
    sim = Simulator(rate=5000, mode="kraken")
    try:
        wait_for(lambda: sim.client.status()["last_id"] >= sim.client.status()["first_id"] + 2500,
                 10, "trades")
        sim.client.pause()
        status = sim.client.status()
        start = status["first_id"] + 1234
        before = sim.client.history(start - 1, start - 1)[0]
        for known_time in (before[3], None):       # None: after a restart the time is found by search
            adapter = kraken.KrakenAdapter(SYMBOL, "ws://unused/v2", f"http://127.0.0.1:{sim.port}")
            adapter.pacer = kraken.RequestPacer(1000, 1000)        # the simulator sets no limit
            from_id, got, after_ts = start, [], known_time
            while True:
                page, exhausted = adapter.fetch_page(from_id, after_ts)
                got += page
                if exhausted:
                    break
                from_id, after_ts = page[-1].id + 1, page[-1].ts
            assert [t.id for t in got] == list(range(start, status["last_id"] + 1))
            history = sim.client.history(start, status["last_id"])
            assert [(t.id, t.p, t.q, t.ts, t.side) for t in got] == [
                (r[0], r[1], r[2], r[3], "sell" if r[4] else "buy") for r in history]
    finally:
        stop_simulator(sim.process)


# --- the whole stack ------------------------------------------------------------------------------

@pytest.fixture
def kraken_sim():
    simulator = Simulator(rate=RATE, mode="kraken")
    yield simulator
    simulator.stop()




@pytest.mark.integration
@pytest.mark.parametrize("fault", ["drop", "cut", "fragment", "stall", "rest429", "garbage"])
def test_fault_through_the_stack_every_trade_exactly_once(primary, primary_client, kraken_sim, fault):
    stack = start_stack(primary, kraken_sim)
    try:
        wait_source_trades(primary_client, kraken_sim, RATE)
        control = kraken_sim.client
        if fault == "stall":
            control.fault("stall", seconds=2)
            time.sleep(2.5)
        elif fault == "fragment":
            control.fault("fragment", on=1)
            time.sleep(1.5)
            control.fault("fragment", on=0)
        elif fault == "rest429":
            control.fault("rest429", count=2)       # the backfill after the drop meets rate-limit errors
            control.fault("drop")
            time.sleep(1.0)
        else:
            control.fault(fault)
            time.sleep(1.0)
        wait_source_trades(primary_client, kraken_sim, RATE)
        verdict = assert_exact(primary_client, kraken_sim)
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
def test_ingest_restart_backfills_by_the_stored_cursor_time(primary, primary_client, kraken_sim):
    stack = start_stack(primary, kraken_sim)
    try:
        wait_source_trades(primary_client, kraken_sim, RATE)
        stack.stop("ingest")
        time.sleep(2)          # about 1,000 trades printed while nobody listens
        stack.start("ingest")
        wait_source_trades(primary_client, kraken_sim, RATE)
        assert_exact(primary_client, kraken_sim)
        assert "event=backfilled" in open(stack.log_path("ingest")).read()
    finally:
        remove_stack(stack)


# --- the reassembler hooks: a v2 message cut by a lost connection -------------------------------

def test_cut_update_is_counted_but_names_no_trade_id():
    adapter = kraken.KrakenAdapter(SYMBOL)
    reassembler = adapter.make_reassembler(1 << 20)
    message = update(item(trade_id="7"), item(trade_id="8"))
    frame = encode_message(message)
    keep = message.index(b'"trade_id":8') + len(b'"trade_id":8,')
    assert reassembler.feed(frame[:len(frame) - len(message) + keep]) == []
    sample = reassembler.connection_lost()
    # The ids sit inside the "data" array, which is not sampled: nothing is read, nothing guessed.
    assert sample == {} and adapter.cut_record_id(sample) is None
    assert (reassembler.partial_seen, reassembler.recovered) == (1, 0)
    assert adapter.cut_record_id({"channel": "trade", "trade_id": 8}) is None
    assert adapter.make_reassembler(4096).frames.max_message_bytes == 4096


def test_two_updates_in_one_message_are_malformed_json_then_split():
    first, second = update(item(trade_id="7")), update(item(trade_id="8"), item(trade_id="9"))
    with pytest.raises(MalformedJSON):
        kraken.parse_ws(first + second, SYMBOL, 1)
    adapter = kraken.KrakenAdapter(SYMBOL)
    results, rejects, _ = parse_socket_read(adapter.make_reassembler(1 << 20), encode_message(first + second),
                                            adapter.parse, 1)
    assert [[trade.id for trade in batch] for batch in results] == [[7], [8, 9]] and rejects == []


def test_an_update_split_across_two_messages_is_joined():
    adapter = kraken.KrakenAdapter(SYMBOL)
    reassembler = adapter.make_reassembler(1 << 20)
    message = update(item(trade_id="7"))
    half = len(message) // 2
    assert parse_socket_read(reassembler, encode_message(message[:half]), adapter.parse, 1)[:2] == ([], [])
    results, rejects, _ = parse_socket_read(reassembler, encode_message(message[half:]), adapter.parse, 1)
    assert [[trade.id for trade in batch] for batch in results] == [[7]] and rejects == []
