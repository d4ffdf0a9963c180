"""The Binance parsers: every trade exact, every bad message a BadMessage with a reason, noise ignored."""

import collections
import json
import re
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btcfeed.trade import (BadMessage, Trade, decode_batch, encode_batch, parse_binance_rest,
                          parse_binance_rest_agg, parse_binance_ws, qty_units)

SYMBOL = "BTCUSDT"
RTS = 1_700_000_000_123
# A real recorded Binance combined stream (depth, bookTicker, kline and aggTrade messages), kept in
# the repository so the tests do not depend on anything outside it.
CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binance-spot-combined.jsonl"
POSITIVE_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")
DROP = object()  # as a field value: remove the field


def ws_trade(**changes):
    """A trade event as the /ws/btcusdt@trade stream sends it, with some fields changed or removed."""
    message = {"e": "trade", "E": 1700000000100, "s": SYMBOL, "t": 3141592653, "p": "43210.01000000",
               "q": "0.00123000", "T": 1700000000099, "m": True, "M": True}
    for key, value in changes.items():
        if value is DROP:
            del message[key]
        else:
            message[key] = value
    return message


def rest_trade(**changes):
    """One element of GET /api/v3/historicalTrades, with some fields changed or removed."""
    item = {"id": 3141592653, "price": "43210.01000000", "qty": "0.00123000", "quoteQty": "53.14831230",
            "time": 1700000000099, "isBuyerMaker": False, "isBestMatch": True}
    for key, value in changes.items():
        if value is DROP:
            del item[key]
        else:
            item[key] = value
    return item


def raw(message) -> str:
    return json.dumps(message)


def combined(message, stream="btcusdt@trade") -> str:
    return json.dumps({"stream": stream, "data": message})


def bad_reason(text) -> str:
    with pytest.raises(BadMessage) as caught:
        parse_binance_ws(text, SYMBOL, RTS)
    return str(caught.value)


# --- websocket trades ---------------------------------------------------------------------------

def test_raw_trade_is_parsed_exactly():
    trade = parse_binance_ws(raw(ws_trade()), SYMBOL, RTS)
    assert trade == Trade(3141592653, "43210.01000000", "0.00123000", "sell", 1700000000099, RTS)


def test_combined_trade_is_the_same_as_raw():
    from_raw = parse_binance_ws(raw(ws_trade()), SYMBOL, RTS)
    assert from_raw is not None and parse_binance_ws(combined(ws_trade()), SYMBOL, RTS) == from_raw


def test_bytes_are_accepted_like_text():
    assert parse_binance_ws(raw(ws_trade()).encode(), SYMBOL, RTS).id == 3141592653


@pytest.mark.parametrize("buyer_is_maker, taker_side", [(True, "sell"), (False, "buy")])
def test_side_is_the_takers(buyer_is_maker, taker_side):
    assert parse_binance_ws(raw(ws_trade(m=buyer_is_maker)), SYMBOL, RTS).side == taker_side
    assert parse_binance_ws(combined(ws_trade(m=buyer_is_maker)), SYMBOL, RTS).side == taker_side


def test_prices_and_quantities_keep_the_exchange_text():
    trade = parse_binance_ws(raw(ws_trade(p="0000043210.10", q="12")), SYMBOL, RTS)
    assert (trade.p, trade.q) == ("0000043210.10", "12")


def test_the_receive_time_is_the_callers_not_the_exchanges():
    assert parse_binance_ws(raw(ws_trade()), SYMBOL, 42).rts == 42


def test_trade_id_zero_is_valid():
    assert parse_binance_ws(raw(ws_trade(t=0)), SYMBOL, RTS).id == 0


def test_qty_with_exactly_eight_decimals_and_trailing_zeros_is_valid():
    assert parse_binance_ws(raw(ws_trade(q="0.000000010000")), SYMBOL, RTS).q == "0.000000010000"


def test_fields_are_the_stream_entry_strings():
    trade = parse_binance_ws(raw(ws_trade()), SYMBOL, RTS)
    assert trade.fields() == {"id": "3141592653", "p": "43210.01000000", "q": "0.00123000", "side": "sell",
                              "ts": "1700000000099", "rts": str(RTS)}


# --- websocket rejects --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ['{"e":"trade",', "", "not json", b"\xff\xfe\x00garbage", "{'e': 'trade'}"])
def test_malformed_json_is_bad(text):
    assert "malformed JSON" in bad_reason(text)


def test_absurdly_deep_nesting_is_bad_not_a_crash():
    assert "malformed JSON" in bad_reason("[" * 200_000 + "]" * 200_000)


@pytest.mark.parametrize("text", ["[]", "[1, 2]", '"trade"', "42", "null", "true"])
def test_non_object_json_is_bad(text):
    assert "not a JSON object" in bad_reason(text)


@pytest.mark.parametrize("data", [[ws_trade()], "trade", None, 7])
def test_combined_data_that_is_not_an_object_is_bad(data):
    reason = bad_reason(json.dumps({"stream": "x", "data": data}))
    assert reason == "combined stream data is not a JSON object"


@pytest.mark.parametrize("message", [
    {}, {"e": "fancyNewEvent", "s": SYMBOL}, {"e": ["trade"]}, {"e": {"x": 1}}, {"e": 5},
    {"s": SYMBOL, "p": "1.0", "q": "1.0"}, {"result": None}, {"id": 1}, {"code": 2, "msg": "Invalid request"},
])
def test_unknown_shape_is_bad(message):
    assert bad_reason(raw(message)) == "unknown message shape"


@pytest.mark.parametrize("symbol", ["ETHUSDT", "btcusdt", "", None, 5])
def test_trade_for_another_symbol_is_bad(symbol):
    reason = bad_reason(raw(ws_trade(s=symbol)))
    assert "symbol" in reason and "expected BTCUSDT" in reason


def test_symbol_is_required_on_a_trade():
    assert "symbol" in bad_reason(raw(ws_trade(s=DROP)))


BAD_DECIMALS = ["0", "0.0", "0.00000000", "000", "-1", "-0.5", "abc", "NaN", "nan", "Infinity", "1e5", "1E5",
                "1.5e-3", "", " 1", "1 ", "1\n", "1.", ".5", "1,5", "+1", "0x10", "1.2.3", "١٢", 1, 1.5, None,
                True, ["1"], {"v": "1"}, "1" * 21]


@pytest.mark.parametrize("value", BAD_DECIMALS, ids=repr)
def test_bad_price_is_bad(value):
    assert "price" in bad_reason(raw(ws_trade(p=value)))


@pytest.mark.parametrize("value", BAD_DECIMALS, ids=repr)
def test_bad_qty_is_bad(value):
    assert "qty" in bad_reason(raw(ws_trade(q=value)))


def test_zero_is_called_zero():
    assert bad_reason(raw(ws_trade(p="0.00000000"))) == "price is zero"
    assert bad_reason(raw(ws_trade(q="0"))) == "qty is zero"


def test_qty_finer_than_eight_decimals_is_bad():
    assert "more than 8 decimals" in bad_reason(raw(ws_trade(q="0.000000001")))
    assert "more than 8 decimals" in bad_reason(raw(ws_trade(q="1.123456789")))


def test_price_may_have_more_than_eight_decimals():
    assert parse_binance_ws(raw(ws_trade(p="0.0000000001")), SYMBOL, RTS).p == "0.0000000001"


@pytest.mark.parametrize("field, name", [("t", "trade id"), ("T", "trade time")])
@pytest.mark.parametrize("value", [True, False, 1.0, 12.5, -1, "123", None, [1], {"id": 1}])
def test_bad_integer_is_bad(field, name, value):
    assert name in bad_reason(raw(ws_trade(**{field: value})))


@pytest.mark.parametrize("value", [1, 0, "true", None, "false"])
def test_buyer_maker_flag_must_be_a_boolean(value):
    assert "buyer-maker flag" in bad_reason(raw(ws_trade(m=value)))


@pytest.mark.parametrize("field, name", [("t", "trade id"), ("p", "price"), ("q", "qty"),
                                         ("m", "buyer-maker flag"), ("T", "trade time")])
def test_missing_field_is_bad(field, name):
    assert name in bad_reason(raw(ws_trade(**{field: DROP})))
    assert name in bad_reason(combined(ws_trade(**{field: DROP})))


def test_reason_of_a_long_bad_value_is_short():
    assert len(bad_reason(raw(ws_trade(p="9" * 5000)))) < 100


# --- websocket messages that are not trades -----------------------------------------------------

NON_TRADES = {
    "depthUpdate": {"e": "depthUpdate", "E": 1, "s": SYMBOL, "U": 1, "u": 2, "b": [["1.0", "2.0"]], "a": []},
    "kline": {"e": "kline", "E": 1, "s": SYMBOL,
              "k": {"t": 0, "T": 59999, "s": SYMBOL, "i": "1m", "o": "1.0", "c": "1.1", "h": "1.2",
                    "l": "0.9", "v": "5.0", "x": False}},
    "aggTrade": {"e": "aggTrade", "E": 1, "s": SYMBOL, "a": 5, "p": "43210.01", "q": "0.1", "f": 10, "l": 12,
                 "T": 1, "m": True, "M": True},
    "bookTicker with e": {"e": "bookTicker", "u": 1, "s": SYMBOL, "b": "1.0", "B": "2.0", "a": "1.1",
                          "A": "3.0"},
    "bookTicker without e": {"u": 1, "s": SYMBOL, "b": "1.0", "B": "2.0", "a": "1.1", "A": "3.0"},
    "24hrTicker": {"e": "24hrTicker", "E": 1, "s": SYMBOL, "c": "43210.0"},
    "subscription reply": {"result": None, "id": 1},
    "list subscriptions reply": {"result": ["btcusdt@trade"], "id": 2},
}


@pytest.mark.parametrize("name", sorted(NON_TRADES))
def test_known_non_trade_events_are_none(name):
    assert parse_binance_ws(raw(NON_TRADES[name]), SYMBOL, RTS) is None
    assert parse_binance_ws(combined(NON_TRADES[name], "btcusdt@x"), SYMBOL, RTS) is None


def test_non_trade_events_of_other_symbols_are_none_too():
    assert parse_binance_ws(raw({**NON_TRADES["aggTrade"], "s": "ETHUSDT"}), SYMBOL, RTS) is None


# --- the real capture ---------------------------------------------------------------------------

def capture_lines() -> list:
    assert CAPTURE.exists(), f"missing capture {CAPTURE}"
    return CAPTURE.read_bytes().splitlines()


def stream_kind(line: bytes) -> str:
    stream = json.loads(line)["stream"]
    return stream.split("@")[1].split("_")[0]


def test_real_capture_parses_without_a_crash():
    lines = capture_lines()
    outcomes = collections.Counter()
    kinds = collections.Counter()
    for line in lines:
        kinds[stream_kind(line)] += 1
        symbol = json.loads(line)["data"]["s"]
        for expected in (SYMBOL, symbol):
            try:
                result = parse_binance_ws(line, expected, RTS)
            except BadMessage as exc:
                assert "expected" in str(exc), f"{exc} for {line[:120]!r}"
                outcomes["wrong symbol"] += 1
            else:
                outcomes["trade" if isinstance(result, Trade) else "none" if result is None else "?"] += 1
    # The capture holds market-data noise only: depth, book ticker, klines and aggregate trades.
    assert len(lines) == 265
    assert kinds == {"depth": 177, "bookTicker": 84, "kline": 2, "aggTrade": 2}
    assert outcomes == {"none": 2 * 265}


def test_real_capture_book_ticker_has_no_event_field():
    # Binance spot sends bookTicker updates without "e"; they must still be recognised as noise.
    tickers = [json.loads(line)["data"] for line in capture_lines()
               if stream_kind(line) == "bookTicker"]
    assert tickers and all("e" not in data for data in tickers)
    assert all(parse_binance_ws(json.dumps(data), data["s"], RTS) is None for data in tickers)


def test_real_capture_aggregate_trades_do_not_become_trades():
    agg = [line for line in capture_lines() if stream_kind(line) == "aggTrade"]
    assert len(agg) == 2
    for line in agg:
        data = json.loads(line)["data"]
        assert {"p", "q", "T", "m"} <= data.keys()  # looks like a trade, yet is an aggregate
        assert parse_binance_ws(line, data["s"], RTS) is None


def test_capture_aggregate_trades_rewritten_as_trades_parse():
    # The aggregate trades of the capture, turned into plain trade events, parse to their own values.
    for line in capture_lines():
        if stream_kind(line) != "aggTrade":
            continue
        data = json.loads(line)["data"]
        message = {"e": "trade", "E": data["E"], "s": data["s"], "t": data["a"], "p": data["p"],
                   "q": data["q"], "T": data["T"], "m": data["m"], "M": True}
        trade = parse_binance_ws(combined(message), data["s"], RTS)
        assert trade == Trade(data["a"], data["p"], data["q"], "sell" if data["m"] else "buy", data["T"], RTS)


# --- REST ---------------------------------------------------------------------------------------

def test_rest_trade_is_parsed_exactly():
    assert parse_binance_rest(rest_trade(), RTS) == Trade(3141592653, "43210.01000000", "0.00123000", "buy",
                                                          1700000000099, RTS)
    assert parse_binance_rest(rest_trade(isBuyerMaker=True), RTS).side == "sell"


def test_rest_and_ws_agree_on_the_same_trade():
    ws = parse_binance_ws(raw(ws_trade(m=False)), SYMBOL, RTS)
    assert parse_binance_rest(rest_trade(), RTS) == ws


@pytest.mark.parametrize("item", [[rest_trade()], "trade", None, 5])
def test_rest_item_that_is_not_an_object_is_bad(item):
    with pytest.raises(BadMessage, match="not a JSON object"):
        parse_binance_rest(item, RTS)


@pytest.mark.parametrize("field, value, name", [
    ("id", True, "trade id"), ("id", 1.0, "trade id"), ("id", -5, "trade id"), ("id", "5", "trade id"),
    ("id", DROP, "trade id"), ("price", "0", "price"), ("price", "-1.0", "price"), ("price", "1e5", "price"),
    ("price", "NaN", "price"), ("price", "", "price"), ("price", 43210.01, "price"), ("price", DROP, "price"),
    ("qty", "0.00000000", "qty"), ("qty", "0.123456789", "qty"), ("qty", "abc", "qty"), ("qty", DROP, "qty"),
    ("time", False, "trade time"), ("time", 1.5e12, "trade time"), ("time", DROP, "trade time"),
    ("isBuyerMaker", "true", "buyer-maker flag"), ("isBuyerMaker", DROP, "buyer-maker flag"),
])
def test_rest_bad_field_is_bad(field, value, name):
    with pytest.raises(BadMessage, match=name):
        parse_binance_rest(rest_trade(**{field: value}), RTS)


# --- quantities and the bus batch ---------------------------------------------------------------

@pytest.mark.parametrize("qty, units", [
    ("1", 100_000_000), ("0.00000001", 1), ("0.1", 10_000_000), ("0.10000000", 10_000_000),
    ("12.5", 1_250_000_000), ("0.000000010000", 1), ("21000000.00000000", 2_100_000_000_000_000),
    ("007.00100000", 700_100_000), ("99999999999999999999.99999999", 9_999_999_999_999_999_999_999_999_999),
])
def test_qty_units(qty, units):
    assert qty_units(qty) == units


def test_qty_units_agree_with_decimal_arithmetic():
    for qty in ("0.00123000", "3.14159265", "1000", "0.5"):
        assert qty_units(qty) == int(Decimal(qty) * 10 ** 8)


def test_batch_round_trip():
    trades = [Trade(1, "43210.01000000", "0.00123000", "sell", 1700000000099, RTS),
              Trade(2, "43210.02", "5", "buy", 1700000000100, RTS + 1),
              Trade(2 ** 40, "0.00000001", "0.00000001", "buy", 0, 0)]
    payload = encode_batch(trades)
    assert decode_batch(payload) == trades
    assert decode_batch(payload.decode()) == trades


def test_batch_rows_carry_qty_units_and_no_spaces():
    trades = [Trade(7, "1.5", "0.25", "buy", 10, 11), Trade(8, "1.6", "2", "sell", 12, 13)]
    payload = encode_batch(trades)
    assert b" " not in payload
    assert json.loads(payload) == [[7, "1.5", "0.25", "buy", 10, 11, 25_000_000],
                                   [8, "1.6", "2", "sell", 12, 13, 200_000_000]]


def test_empty_batch_round_trip():
    assert decode_batch(encode_batch([])) == []


# --- property: nothing but BadMessage, nothing but positive decimals ----------------------------

def check_result(result):
    """The result of parsing is None or a trade whose every field is valid."""
    if result is None:
        return
    assert isinstance(result, Trade)
    assert type(result.id) is int and result.id >= 0
    assert type(result.ts) is int and result.ts >= 0
    assert result.side in ("buy", "sell")
    for value in (result.p, result.q):
        assert isinstance(value, str) and POSITIVE_DECIMAL.fullmatch(value), value
        assert Decimal(value) > 0
    assert qty_units(result.q) == Decimal(result.q) * 10 ** 8
    assert decode_batch(encode_batch([result])) == [result]


def parse_or_bad(text):
    try:
        return parse_binance_ws(text, SYMBOL, RTS)
    except BadMessage as exc:
        assert str(exc)
        return None


json_scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)
decimal_like = st.from_regex(r"[-+ ]?[0-9]{0,22}(\.[0-9]{0,22})?([eE][-+]?[0-9]{1,3})?\s?", fullmatch=True)
field_values = json_values | decimal_like | st.sampled_from(["0", "1", "0.00000001", "1\n", "NaN", "1e5"])


@st.composite
def trade_like(draw):
    """A trade event with some fields replaced, dropped or added, raw or combined."""
    message = ws_trade()
    for key in draw(st.lists(st.sampled_from(["e", "s", "t", "p", "q", "T", "m", "E", "x"]), max_size=4)):
        if draw(st.booleans()):
            message.pop(key, None)
        else:
            message[key] = draw(field_values)
    text = json.dumps(message) if draw(st.booleans()) else combined(message)
    return text.encode() if draw(st.booleans()) else text


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.text())
def test_any_text_gives_none_a_valid_trade_or_bad_message(text):
    check_result(parse_or_bad(text))


@PROPERTY
@given(st.binary())
def test_any_bytes_give_none_a_valid_trade_or_bad_message(data):
    check_result(parse_or_bad(data))


@PROPERTY
@given(json_values.map(json.dumps))
def test_any_json_gives_none_a_valid_trade_or_bad_message(text):
    check_result(parse_or_bad(text))


@PROPERTY
@given(trade_like())
def test_almost_trades_give_none_a_valid_trade_or_bad_message(text):
    check_result(parse_or_bad(text))


@PROPERTY
@given(decimal_like, decimal_like)
def test_only_positive_decimal_strings_pass_as_price_and_qty(price, qty):
    try:
        trade = parse_binance_ws(raw(ws_trade(p=price, q=qty)), SYMBOL, RTS)
    except BadMessage:
        valid = all(POSITIVE_DECIMAL.fullmatch(v) and len(v) <= 41 and Decimal(v) > 0 for v in (price, qty))
        fine_qty = valid and len(qty.partition(".")[2].rstrip("0")) > 8
        too_long = valid and any(len(part) > 20 for v in (price, qty) for part in v.split("."))
        too_large = valid and len(qty.partition(".")[0].lstrip("0")) > 7     # 10 million BTC or more
        assert not valid or fine_qty or too_long or too_large
    else:
        check_result(trade)
        assert (trade.p, trade.q) == (price, qty)


@pytest.mark.parametrize("field, value, reason", [
    ("q", "190000000000", "implausibly large"),
    ("q", "10000000.5", "implausibly large"),
    ("t", 2 ** 53, "beyond what the apply script keeps exact"),
    ("T", 2 ** 60, "beyond what the apply script keeps exact"),
])
def test_values_the_apply_script_could_not_keep_exact_are_rejected(field, value, reason):
    with pytest.raises(BadMessage, match=reason):
        parse_binance_ws(raw(ws_trade(**{field: value})), SYMBOL, RTS)


def test_largest_accepted_qty_still_encodes():
    trade = parse_binance_ws(raw(ws_trade(q="9999999.99999999")), SYMBOL, RTS)
    assert decode_batch(encode_batch([trade])) == [trade]


# --- aggregate trades (the "aggTrade" record kind) ----------------------------------------------

def ws_agg(**changes):
    """An event of the /ws/btcusdt@aggTrade stream, with some fields changed or removed."""
    message = {"e": "aggTrade", "E": 1700000000100, "s": SYMBOL, "a": 26129, "p": "43210.01000000",
               "q": "4.70443515", "f": 27781, "l": 27783, "T": 1700000000099, "m": False, "M": True}
    for key, value in changes.items():
        if value is DROP:
            del message[key]
        else:
            message[key] = value
    return message


def rest_agg(**changes):
    """One element of GET /api/v3/aggTrades: the stream event's short keys without e, E and s."""
    item = {k: v for k, v in ws_agg().items() if k not in ("e", "E", "s")}
    item.update(changes)
    return {k: v for k, v in item.items() if v is not DROP}


def agg_bad_reason(text) -> str:
    with pytest.raises(BadMessage) as caught:
        parse_binance_ws(text, SYMBOL, RTS, kind="aggTrade")
    return str(caught.value)


def test_aggregate_trade_is_parsed_exactly_with_the_aggregate_id():
    expected = Trade(26129, "43210.01000000", "4.70443515", "buy", 1700000000099, RTS)
    assert parse_binance_ws(raw(ws_agg()), SYMBOL, RTS, kind="aggTrade") == expected
    assert parse_binance_ws(combined(ws_agg(), "btcusdt@aggTrade"), SYMBOL, RTS, kind="aggTrade") == expected


def test_the_default_kind_is_unchanged():
    assert parse_binance_ws(raw(ws_agg()), SYMBOL, RTS) is None
    text = raw(ws_trade())
    assert parse_binance_ws(text, SYMBOL, RTS) == parse_binance_ws(text, SYMBOL, RTS, "trade")


def test_plain_trades_are_noise_when_aggregates_are_followed():
    assert parse_binance_ws(raw(ws_trade()), SYMBOL, RTS, kind="aggTrade") is None
    assert parse_binance_ws(combined(ws_trade()), SYMBOL, RTS, kind="aggTrade") is None


@pytest.mark.parametrize("name", sorted(NON_TRADES))
def test_other_events_are_noise_for_aggregates_too(name):
    if name == "aggTrade":
        return
    assert parse_binance_ws(raw(NON_TRADES[name]), SYMBOL, RTS, kind="aggTrade") is None


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown Binance record kind"):
        parse_binance_ws(raw(ws_trade()), SYMBOL, RTS, kind="trades")
    with pytest.raises(ValueError, match="unknown Binance record kind"):
        parse_binance_rest(rest_trade(), RTS, kind="agg")


@pytest.mark.parametrize("field, value, name", [
    ("a", True, "aggregate trade id"), ("a", -1, "aggregate trade id"), ("a", 1.0, "aggregate trade id"),
    ("a", "26129", "aggregate trade id"), ("a", 2 ** 53, "aggregate trade id"),
    ("a", DROP, "aggregate trade id"),
    ("f", False, "first trade id"), ("f", DROP, "first trade id"), ("l", None, "last trade id"),
    ("l", 27780, "last trade id is before its first"), ("p", "1e5", "price"), ("p", "NaN", "price"),
    ("p", 43210.01, "price"), ("q", "0", "qty"), ("q", "-4.7", "qty"), ("q", "Infinity", "qty"),
    ("T", True, "trade time"), ("m", 0, "buyer-maker flag"), ("m", DROP, "buyer-maker flag"),
])
def test_bad_aggregate_fields_are_bad(field, value, name):
    assert name in agg_bad_reason(raw(ws_agg(**{field: value})))
    with pytest.raises(BadMessage, match=name):
        parse_binance_rest(rest_agg(**{field: value}), RTS, kind="aggTrade")


def test_aggregate_for_another_symbol_is_bad():
    assert agg_bad_reason(raw(ws_agg(s="ETHUSDT"))) == "aggTrade for symbol 'ETHUSDT', expected BTCUSDT"


def test_rest_aggregate_rows_are_parsed_like_the_stream():
    from_stream = parse_binance_ws(raw(ws_agg()), SYMBOL, RTS, kind="aggTrade")
    assert parse_binance_rest_agg(rest_agg(), RTS) == from_stream
    assert parse_binance_rest(rest_agg(m=True), RTS, kind="aggTrade").side == "sell"
    assert parse_binance_rest(rest_agg(f=5, l=5), RTS, kind="aggTrade").id == 26129


@pytest.mark.parametrize("item", [[rest_agg()], "x", None])
def test_rest_aggregate_row_that_is_not_an_object_is_bad(item):
    with pytest.raises(BadMessage, match="not a JSON object"):
        parse_binance_rest_agg(item, RTS)


# --- hostile input: every reason short, nothing but BadMessage ----------------------------------

HUGE = "9" * 1_000_000


@pytest.mark.parametrize("message, reason", [
    (ws_trade(s=HUGE), "symbol"), (ws_trade(e=HUGE), "unknown message shape"), (ws_trade(p=HUGE), "price"),
    (ws_trade(q="0." + HUGE), "qty"), (ws_trade(t=int(HUGE[:30])), "trade id"),
    (ws_trade(m=HUGE), "buyer-maker"),
    (ws_trade(t=2 ** 53 + 1), "trade id"), (ws_trade(t=9007199254740993.0), "trade id"),
])
def test_huge_values_are_bad_with_a_short_reason(message, reason):
    text = raw(message)
    found = bad_reason(text)
    assert reason in found and len(found) < 120


@pytest.mark.parametrize("text", ['{"e":"trade","p":NaN}', '{"e":"trade","p":Infinity}',
                                  '{"e":"trade","t":1e400}', '{"e":"trade","s":"\\ud800"}'])
def test_non_json_numbers_and_lone_surrogates_are_malformed(text):
    assert "malformed JSON" in bad_reason(text)


def test_server_shutdown_notice_is_recognised_raw_and_combined():
    from btcfeed.trade import ServerShutdown
    raw = b'{"e":"serverShutdown","E":1700000000000}'
    assert parse_binance_ws(raw, "BTCUSDT", 1) == ServerShutdown(1700000000000)
    combined = b'{"stream":"btcusdt@trade","data":{"e":"serverShutdown","E":5}}'
    assert parse_binance_ws(combined, "BTCUSDT", 1) == ServerShutdown(5)
