"""Binance aggregate trades as a source's record kind: the adapter (stream, parser, REST endpoint and
weight, cut-message hooks), the simulator's @aggTrade stream and /api/v3/aggTrades, and a source that
follows aggTrade through the real stack across a dropped connection, checked id by id."""

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websocket

from btcfeed.exchanges import binance


from tools import verify
from btcfeed.exchanges.binance import REST_ENDPOINTS, BinanceAdapter, BinanceRest, stream_url
from btcfeed.config import BINANCE_TRADE_KINDS
from btcfeed.trade import BINANCE_KINDS, MalformedJSON, Trade, parse_socket_read
from harness import (drain, primary_last_id, remove_stack, start_stack, verify_derived, verify_primary,
                     wait_for)
from tools.simulator import SimulatorClient, encode_message, start_simulator, stop_simulator

RATE = 1000
RTS = 1_700_000_000_500
CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binance-spot-combined.jsonl"
# The spot trade event as Binance documents it (the capture holds no plain trades).
TRADE_EVENT = (b'{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100",'
               b'"T":1672515782136,"m":true,"M":true}')
AGG_KEYS = ["e", "E", "s", "a", "p", "q", "f", "l", "T", "m", "M"]
REST_AGG_KEYS = ["a", "p", "q", "f", "l", "T", "m", "M"]


def capture_agg_trade() -> bytes:
    """The first aggTrade of the recorded combined stream (NKNUSDT), as the exchange sent it."""
    return next(line for line in CAPTURE.read_bytes().splitlines() if b'"e":"aggTrade"' in line)


def adapter(kind: str = "aggTrade", symbol: str = "BTCUSDT", form: str = "combined") -> BinanceAdapter:
    return BinanceAdapter(symbol, "wss://stream.binance.com:9443", "https://api.binance.com", form, kind)


# --- stream, parser and REST endpoint per kind ---------------------------------------------------

def test_config_and_parser_agree_on_the_kinds():
    assert BINANCE_TRADE_KINDS == BINANCE_KINDS == tuple(REST_ENDPOINTS)


@pytest.mark.parametrize("kind, form, url", [
    ("trade", "combined", "wss://x:9443/stream?streams=btcusdt@trade"),
    ("trade", "raw", "wss://x:9443/ws/btcusdt@trade"),
    ("aggTrade", "combined", "wss://x:9443/stream?streams=btcusdt@aggTrade"),
    ("aggTrade", "raw", "wss://x:9443/ws/btcusdt@aggTrade"),
])
def test_stream_url_names_the_kind(kind, form, url):
    assert stream_url("wss://x:9443/", "BTCUSDT", form, kind) == url
    assert BinanceAdapter("BTCUSDT", "wss://x:9443", "https://api", form, kind).ws_url == url


def test_stream_url_without_a_kind_is_the_trade_stream():
    assert stream_url("wss://x", "BTCUSDT", "raw") == "wss://x/ws/btcusdt@trade"
    default = BinanceAdapter("BTCUSDT", "wss://x", "https://api")
    assert default.ws_url == "wss://x/stream?streams=btcusdt@trade" and default.kind == "trade"


def test_unknown_kind_is_refused_up_front():
    with pytest.raises(ValueError, match="unknown Binance record kind 'aggTrades'"):
        adapter("aggTrades")
    with pytest.raises(ValueError, match="unknown Binance record kind"):
        stream_url("wss://x", "BTCUSDT", "raw", "trades")


def test_agg_adapter_parses_a_recorded_aggregate_with_its_aggregate_id():
    message = capture_agg_trade()
    assert adapter(symbol="NKNUSDT").parse(message, RTS) == Trade(
        15683430, "0.35280000", "58.00000000", "buy", 1633998523963, RTS)
    assert adapter("trade", symbol="NKNUSDT").parse(message, RTS) is None, "an aggregate is noise to trade"


def test_trade_adapter_parses_trades_and_agg_adapter_ignores_them():
    assert adapter("trade", symbol="BNBBTC").parse(TRADE_EVENT, RTS) == Trade(
        12345, "0.001", "100", "sell", 1672515782136, RTS)
    assert adapter(symbol="BNBBTC").parse(TRADE_EVENT, RTS) is None


@pytest.mark.parametrize("kind", BINANCE_KINDS)
def test_undecodable_text_is_malformed_json_so_it_can_be_split(kind):
    with pytest.raises(MalformedJSON):
        adapter(kind).parse(b'{"e":"aggTrade"}{"e":"aggTrade"}', RTS)


def test_two_aggregates_in_one_message_are_split_and_both_kept():
    reassembler = adapter(symbol="NKNUSDT").make_reassembler(1 << 20)
    first = capture_agg_trade()
    second = first.replace(b'"a":15683430', b'"a":15683431')
    results, rejects, _ = parse_socket_read(reassembler, encode_message(first + second),
                                            adapter(symbol="NKNUSDT").parse, RTS)
    assert [trade.id for trade in results] == [15683430, 15683431] and rejects == []


def test_rest_endpoint_and_weight_per_kind():
    # Binance spot market-data docs: historicalTrades weighs 25, aggTrades 4.
    assert REST_ENDPOINTS["trade"] == ("/api/v3/historicalTrades", 25)
    assert REST_ENDPOINTS["aggTrade"] == ("/api/v3/aggTrades", 4)
    assert adapter().rest.endpoint.path == "/api/v3/aggTrades"
    assert adapter("trade").rest.endpoint.path == "/api/v3/historicalTrades"


@pytest.mark.parametrize("kind, used, pauses", [
    ("trade", 4775, False), ("trade", 4776, True),          # 4775 + 25 = 4800, 80% of 6000
    ("aggTrade", 4796, False), ("aggTrade", 4797, True),    # 4796 + 4 = 4800
    ("aggTrade", 0, False),
])
def test_the_next_call_stays_within_80_percent_of_the_weight_limit(kind, used, pauses):
    rest = BinanceRest("https://api.binance.com", "BTCUSDT", kind=kind)
    rest.used_weight = used
    assert (rest.weight_pause_s() > 0) is pauses
    assert rest.weight_pause_s() <= 60.5


# --- the hooks for a message cut by a lost connection -------------------------------------------

def cut(an_adapter, message: bytes, keep: int):
    """One frame holding `message`, received up to its byte `keep`, then the connection is lost:
    (the adapter's cut record id, the sample, the reassembler's recovered count)."""
    reassembler = an_adapter.make_reassembler(1 << 20)
    frame = encode_message(message)
    header = len(frame) - len(message)
    assert reassembler.feed(frame[:header + keep]) == []
    sample = reassembler.connection_lost()
    return an_adapter.cut_record_id(sample), sample, reassembler.recovered


def test_binance_trade_cut_after_its_id_names_it():
    message = TRADE_EVENT
    after_id = message.index(b'"t":12345,') + len(b'"t":12345,')
    record_id, sample, recovered = cut(adapter("trade", symbol="BNBBTC"), message, after_id)
    assert record_id == 12345 and sample["e"] == "trade" and recovered == 1
    # Inside the id the digits may be incomplete: nothing is read.
    assert cut(adapter("trade", symbol="BNBBTC"), message, after_id - 2)[0] is None


def test_binance_combined_trade_cut_after_its_id_names_it():
    message = b'{"stream":"bnbbtc@trade","data":' + TRADE_EVENT + b"}"
    keep = message.index(b'"p":')
    assert cut(adapter("trade", symbol="BNBBTC"), message, keep)[0] == 12345


def test_recorded_aggregate_cut_after_its_id_names_the_aggregate_id():
    message = capture_agg_trade()
    keep = message.index(b'"p":')
    assert cut(adapter(symbol="NKNUSDT"), message, keep)[0] == 15683430
    assert cut(adapter("trade", symbol="NKNUSDT"), message, keep)[0] is None, "not the followed kind"
    assert cut(adapter(symbol="BTCUSDT"), message, keep)[0] is None, "not the followed symbol"


def test_a_cut_depth_update_names_nothing():
    depth = next(line for line in CAPTURE.read_bytes().splitlines() if b"depthUpdate" in line)
    record_id, _, recovered = cut(adapter(symbol="NKNUSDT"), depth, len(depth) - 5)
    assert record_id is None and recovered == 0


def test_nothing_cut_means_no_sample_and_no_id():
    reassembler = adapter().make_reassembler(1 << 20)
    assert reassembler.connection_lost() is None
    assert adapter().cut_record_id(None) is None
    assert adapter().cut_record_id({}) is None


def test_the_reassembler_takes_the_message_bound():
    assert adapter().make_reassembler(4096).frames.max_message_bytes == 4096


# --- the simulator: @aggTrade stream and /api/v3/aggTrades ---------------------------------------

@pytest.fixture(scope="module")
def agg_sim(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("agg-sim") / "sim.log"
    process, port = start_simulator(rate=1000, seed=7, log_path=str(log_path))
    yield port
    stop_simulator(process)


def sim_get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def sim_control(port: int) -> SimulatorClient:
    return SimulatorClient(f"http://127.0.0.1:{port}")


def receive(port: int, path: str, count: int) -> list:
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=5)
    try:
        return [json.loads(ws.recv()) for _ in range(count)]
    finally:
        ws.close()


def wait_history(port: int, trades: int) -> dict:
    return wait_for(lambda: (lambda s: s if s["last_id"] - s["first_id"] >= trades else None)(
        sim_control(port).status()), 10, f"{trades} simulated trades")


@pytest.mark.integration
@pytest.mark.parametrize("path", ["/ws/btcusdt@aggTrade", "/stream?streams=btcusdt@aggTrade"])
def test_agg_stream_sends_one_aggregate_per_trade_matching_the_history(agg_sim, path):
    messages = receive(agg_sim, path, 200)
    if path.startswith("/stream"):
        assert {message["stream"] for message in messages} == {"btcusdt@aggTrade"}
        messages = [message["data"] for message in messages]
    for data in messages:
        assert list(data) == AGG_KEYS
        assert data["e"] == "aggTrade" and data["s"] == "BTCUSDT" and data["M"] is True
        assert data["a"] == data["f"] == data["l"]
    ids = [data["a"] for data in messages]
    assert ids == list(range(ids[0], ids[0] + 200))
    rows = sim_control(agg_sim).history(ids[0], ids[-1])
    assert rows == [[data["a"], data["p"], data["q"], data["T"], data["m"]] for data in messages]
    parsed = [adapter().parse(json.dumps(data), RTS) for data in messages]
    assert [trade.id for trade in parsed] == ids


@pytest.mark.integration
def test_trade_and_agg_streams_on_one_connection_carry_the_same_ids(agg_sim):
    messages = receive(agg_sim, "/stream?streams=btcusdt@trade/btcusdt@aggTrade", 400)
    trade_ids = [m["data"]["t"] for m in messages if m["stream"] == "btcusdt@trade"]
    agg_ids = [m["data"]["a"] for m in messages if m["stream"] == "btcusdt@aggTrade"]
    common_ids = sorted(set(trade_ids) & set(agg_ids))
    assert len(common_ids) > 100
    assert common_ids == list(range(common_ids[0], common_ids[-1] + 1))


@pytest.mark.integration
def test_agg_trades_rest_pages_follow_each_other_and_match_the_trades(agg_sim):
    status = wait_history(agg_sim, 600)
    start = status["first_id"] + 10
    code, headers, page = sim_get(agg_sim, f"/api/v3/aggTrades?symbol=BTCUSDT&limit=100&fromId={start}")
    assert code == 200
    _, _, next_page = sim_get(agg_sim, f"/api/v3/aggTrades?symbol=BTCUSDT&limit=100&fromId={start + 100}")
    assert [row["a"] for row in page + next_page] == list(range(start, start + 200))
    _, _, trades = sim_get(agg_sim, f"/api/v3/historicalTrades?symbol=BTCUSDT&limit=100&fromId={start}")
    for row, trade in zip(page, trades):
        assert list(row) == REST_AGG_KEYS
        assert row["a"] == row["f"] == row["l"] == trade["id"]
        assert (row["p"], row["q"], row["T"], row["m"]) == (trade["price"], trade["qty"], trade["time"],
                                                            trade["isBuyerMaker"])
        assert row["M"] is True


@pytest.mark.integration
def test_agg_trades_rest_latest_weight_and_errors(agg_sim):
    before = sim_control(agg_sim).status()["last_id"]
    code, headers, latest = sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=5")
    assert code == 200 and len(latest) == 5 and latest[-1]["a"] >= before
    assert [row["a"] for row in latest] == list(range(latest[0]["a"], latest[0]["a"] + 5))
    weight = int(headers["X-MBX-USED-WEIGHT-1M"])
    _, again, _ = sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=5")
    assert int(again["X-MBX-USED-WEIGHT-1M"]) - weight in (4, 4 - weight), "weight 4 (or a new minute)"
    assert sim_get(agg_sim, "/api/v3/aggTrades?limit=5")[2]["code"] == -1102
    assert sim_get(agg_sim, "/api/v3/aggTrades?symbol=ETHUSDT")[2]["code"] == -1121
    assert sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&fromId=x")[0] == 400
    assert sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=1001")[0] == 400


@pytest.mark.integration
def test_agg_trades_rest_is_refused_by_the_rest429_fault(agg_sim):
    sim_control(agg_sim).fault("rest429", count=1)
    code, headers, body = sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=5")
    assert code == 429 and body["code"] == -1003 and headers["Retry-After"] == "1"
    assert sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=5")[0] == 200


@pytest.mark.integration
def test_adapter_backfill_pages_agree_between_kinds(agg_sim):
    status = wait_history(agg_sim, 1500)
    start = status["first_id"] + 1
    base = f"http://127.0.0.1:{agg_sim}"
    agg = BinanceAdapter("BTCUSDT", "ws://unused", base, "combined", "aggTrade")
    plain = BinanceAdapter("BTCUSDT", "ws://unused", base, "combined", "trade")
    agg_page, agg_done = agg.fetch_page(start)
    plain_page, plain_done = plain.fetch_page(start)
    assert len(agg_page) == binance.REST_PAGE_LIMIT and not agg_done
    assert [t[:5] for t in agg_page] == [t[:5] for t in plain_page]
    assert agg.rest.used_weight > 0 and agg.rest_pause_s() == 0.0


@pytest.mark.integration
def test_traffic_shows_streams_and_rest_calls(agg_sim):
    control = sim_control(agg_sim)
    before = control.traffic()["rest_calls"].get("/api/v3/aggTrades", 0)
    sim_get(agg_sim, "/api/v3/aggTrades?symbol=BTCUSDT&limit=1")
    ws = websocket.create_connection(f"ws://127.0.0.1:{agg_sim}/ws/btcusdt@aggTrade", timeout=5)
    try:
        ws.recv()
        traffic = control.traffic()
        assert traffic["streams"].get("btcusdt@aggTrade", 0) >= 1
        assert traffic["rest_calls"]["/api/v3/aggTrades"] == before + 1
    finally:
        ws.close()


# --- through the stack ---------------------------------------------------------------------------

def wait_trades(primary_client, count):
    start = primary_last_id(primary_client)
    if start < 0:
        start = wait_for(lambda: primary_last_id(primary_client) + 1, 20, "a first trade in the primary") - 1
    wait_for(lambda: primary_last_id(primary_client) >= start + count, 20,
             f"{count} more trades in the primary")


@pytest.mark.integration
def test_agg_trade_source_through_the_stack_survives_a_dropped_connection(primary, primary_client, sim):
    stack = start_stack(primary, sim, BTCFEED_BINANCE_TRADE_KIND="aggTrade")
    try:
        wait_trades(primary_client, RATE)
        streams = sim.client.traffic()["streams"]
        assert set(streams) == {"btcusdt@aggTrade"}, f"ingest must follow the aggTrade stream: {streams}"
        sim.client.fault("drop")
        time.sleep(2.5)
        wait_trades(primary_client, RATE)
        last_id = drain(primary_client, sim)
        verdict = verify_primary(primary_client, sim)
        assert verdict.exact(), str(verdict)
        assert verdict.present == verdict.expected >= 2 * RATE
        first = verify.lowest_trade_id(primary_client, sim.source)
        verify_derived(primary_client, sim, first, last_id)
        log = open(stack.log_path("ingest")).read()
        assert "event=connection_lost" in log and "event=backfilled" in log
        rest_calls = sim.client.traffic()["rest_calls"]
        assert rest_calls.get("/api/v3/aggTrades", 0) >= 1, "the backfill reads aggregate trades"
        assert "/api/v3/historicalTrades" not in rest_calls
    finally:
        remove_stack(stack)
