"""Fuzzing the reassembler and the parsers with random bytes and mutated valid messages.

Whatever arrives: no exception but BadMessage or FrameError, and never a trade whose fields are not
exactly what the input says (an independent JSON decoder is the oracle). Bounded: a few seconds.
"""

import json
import re
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btcfeed.trade import (BadMessage, Trade, check_decimal, check_qty, parse_binance_rest, parse_binance_ws,
                          parse_socket_read)
from btcfeed.wsframes import OP_TEXT, FrameError, MessageSplitter, Reassembler, sample_prefix
from samples import fragmented

SYMBOL = "BTCUSDT"
RTS = 1_700_000_000_123
MAX = 1 << 16
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRADE = (b'{"e":"trade","E":1700000000100,"s":"BTCUSDT","t":3141592653,"p":"43210.01000000",'
         b'"q":"0.00123000","T":1700000000099,"m":true,"M":true}')
AGG = (b'{"e":"aggTrade","E":1700000000100,"s":"BTCUSDT","a":26129,"p":"43210.01000000","q":"4.70443515",'
       b'"f":27781,"l":27783,"T":1700000000099,"m":false,"M":true}')
VALID = [
    TRADE, AGG,
    b'{"stream":"btcusdt@trade","data":' + TRADE + b'}',
    b'{"stream":"btcusdt@aggTrade","data":' + AGG + b'}',
    b'{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","E":1,"s":"BTCUSDT","U":1,"u":2,'
    b'"b":[["43210.01","0.5"]],"a":[]}}',
    b'{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":0,"T":59999,"s":"BTCUSDT","i":"1m","o":"1.0","c":"1.1",'
    b'"h":"1.2","l":"0.9","v":"5.0","x":false}}',
    b'{"u":400900217,"s":"BTCUSDT","b":"25.35190000","B":"31.21000000","a":"25.36520000","A":"40.66000000"}',
    b'{"result":null,"id":1}',
]
REST_ROWS = [
    b'{"id":28457,"price":"4.00000100","qty":"12.00000000","quoteQty":"48.000012","time":1499865549590,'
    b'"isBuyerMaker":true,"isBestMatch":true}',
    b'{"a":26129,"p":"0.01633102","q":"4.70443515","f":27781,"l":27781,"T":1498793709153,"m":true,"M":true}',
]
# Bytes and fragments that make a value hostile: exponents, NaN, signs, booleans, huge numbers.
INTERESTING = [
    b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"0", b"9", b".", b"-", b"+", b"e", b"E", b" ", b"\n",
    b"\x00", b"\xff", b"NaN", b"Infinity", b"true", b"null", b"1e5", b"-0", b"9007199254740993",
    b"18446744073709551616", b'"p":"1e5",', b'"t":true,', b'"s":"ETHUSDT",', b'"q":"0",', b'"e":"trade",',
    b"\\u0000", b'"' + b"9" * 5000 + b'"',
]
# Values that keep the message valid JSON, so that the field checks (not the decoder) must catch them.
HOSTILE_VALUES = [
    b'"1e5"', b'"NaN"', b'"Infinity"', b'"-1.0"', b'"0.00000000"', b'" 1"', b'"1\\n"', b'"+1"', b'"0x10"',
    b'"1.2.3"', b'"' + b"9" * 25 + b'"', b'"43210.01"', b'"0.5"', b'"7"', b"1e5", b"NaN", b"43210.01", b"-1",
    b"0", b"1.0", b"true", b"false", b"null", b"[]", b"{}", b"9007199254740992", b"9007199254740991",
    b"18446744073709551616", b'"BTCUSDT"', b'"ETHUSDT"', b'"trade"', b'"aggTrade"', b'"\\u0034\\u0033"',
    b'"' + b"x" * 100_000 + b'"',
]
FIELD = re.compile(rb'"(e|s|t|a|f|l|p|q|T|m|id|price|qty|time|isBuyerMaker)":("[^"]*"|[^,}]*)')


@st.composite
def mutated(draw, bases=VALID):
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["value", "value", "value", "flip", "set", "insert", "delete",
                                       "truncate", "duplicate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        fields = list(FIELD.finditer(data))
        if action == "value" and fields:
            field = draw(st.sampled_from(fields))
            data[field.start(2):field.end(2)] = draw(st.sampled_from(HOSTILE_VALUES))
        elif action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "set" and data:
            data[at:at + 1] = draw(st.sampled_from(INTERESTING))
        elif action == "insert":
            data[at:at] = draw(st.sampled_from(INTERESTING) | st.binary(max_size=8))
        elif action == "delete":
            del data[at:at + draw(st.integers(1, 12))]
        elif action == "truncate":
            del data[at:]
        elif action == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 40))]
    return bytes(data)


def strict_json(raw):
    """The reference decoder: Python's json without NaN/Infinity (which JSON does not have)."""
    def no_constant(name):
        raise ValueError(name)
    return json.loads(raw, parse_constant=no_constant)


def assert_exact_trade(trade: Trade, raw: bytes, fields: dict) -> None:
    """A trade's every field is a value of the input, valid, and verbatim for prices and quantities."""
    assert isinstance(trade, Trade)
    assert trade.rts == RTS
    for value in (trade.p, trade.q):
        assert check_decimal("value", value) == value and Decimal(value) > 0
        if b"\\" not in raw:     # (a JSON escape like \u0031 is the same text to every decoder)
            assert b'"' + value.encode() + b'"' in raw     # the exchange's own text, not a re-rendering
    check_qty(trade.q)
    reference = strict_json(raw)
    if isinstance(reference, dict) and "stream" in reference and "data" in reference:
        reference = reference["data"]
    expected = {name: reference[key] for name, key in fields.items()}
    assert (trade.id, trade.p, trade.q, trade.ts) == tuple(expected[name] for name in ("id", "p", "q", "ts"))
    assert type(expected["id"]) is int and type(expected["ts"]) is int
    assert 0 <= trade.id < 2 ** 53 and 0 <= trade.ts < 2 ** 53
    assert trade.side == ("sell" if expected["m"] is True else "buy") and type(expected["m"]) is bool


WS_FIELDS = {"trade": dict(id="t", p="p", q="q", ts="T", m="m"),
             "aggTrade": dict(id="a", p="p", q="q", ts="T", m="m")}
REST_FIELDS = {"trade": dict(id="id", p="price", q="qty", ts="time", m="isBuyerMaker"),
               "aggTrade": WS_FIELDS["aggTrade"]}


def parse_ws_or_bad(raw, kind):
    try:
        return parse_binance_ws(raw, SYMBOL, RTS, kind=kind)
    except BadMessage as exc:
        assert str(exc)
        return None


def check_ws(raw: bytes, kind: str) -> None:
    trade = parse_ws_or_bad(raw, kind)
    if trade is not None:
        assert_exact_trade(trade, raw, WS_FIELDS[kind])
        reference = strict_json(raw)
        reference = reference.get("data", reference) if "stream" in reference else reference
        assert reference["e"] == kind and reference["s"] == SYMBOL
        if kind == "aggTrade":
            first, last = reference["f"], reference["l"]
            assert type(first) is int and type(last) is int and first <= last


@FUZZ
@given(mutated(), st.sampled_from(["natural", "natural", "trade", "aggTrade"]))
def test_mutated_messages_give_a_bad_message_none_or_an_exact_trade(raw, kind):
    if kind == "natural":       # mostly the kind the message was, so that some mutants still pass
        kind = "aggTrade" if b'"aggTrade"' in raw else "trade"
    check_ws(raw, kind)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(["trade", "aggTrade"]))
def test_random_bytes_give_a_bad_message_or_none(raw, kind):
    check_ws(raw, kind)


@FUZZ
@given(mutated(REST_ROWS), st.sampled_from(["trade", "aggTrade"]))
def test_mutated_rest_rows_give_a_bad_message_or_an_exact_trade(raw, kind):
    try:
        item = json.loads(raw)
    except ValueError:
        return      # the REST client rejects a body that is not JSON before any row is parsed
    try:
        trade = parse_binance_rest(item, RTS, kind=kind)
    except BadMessage as exc:
        assert str(exc)
        return
    assert_exact_trade(trade, raw, REST_FIELDS[kind])


@FUZZ
@given(st.lists(mutated() | st.sampled_from(VALID) | st.binary(max_size=40), min_size=1, max_size=8),
       st.lists(st.integers(0, 5000), max_size=8))
def test_splitter_on_hostile_streams(pieces, cuts):
    """Only FrameError may escape; every piece handed out is a contiguous part of the stream, in order."""
    stream = b"".join(pieces)
    splitter, out = MessageSplitter(MAX), []
    points = sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]
    last = 0
    try:
        for point in points:
            out += splitter.feed(stream[last:point])
            last = point
    except FrameError:
        return
    position = 0
    for piece in out:
        assert piece
        position = stream.index(piece, position) + len(piece)
    for piece in out:
        for kind in ("trade", "aggTrade"):
            check_ws(piece, kind)
    sample_prefix(splitter.pending)


@FUZZ
@given(st.lists(mutated() | st.sampled_from(VALID), min_size=1, max_size=6),
       st.lists(st.integers(0, 400), max_size=3), st.lists(st.integers(0, 5000), max_size=8),
       st.integers(0, 10), st.binary(max_size=6))
def test_reassembler_on_mutated_wire(messages, fragment_cuts, read_cuts, flip_at, noise):
    """Frames of mutated messages, the wire itself damaged: FrameError or exact trades, and a safe sample."""
    wire = bytearray(b"".join(fragmented(OP_TEXT, m, fragment_cuts) for m in messages))
    if noise and wire:
        at = (flip_at * 997) % len(wire)
        wire[at:at] = noise
    reassembler, hot_path, last = Reassembler(MAX), Reassembler(MAX), 0
    points = sorted(set(c % (len(wire) + 1) for c in read_cuts)) + [len(wire)]
    try:
        for point in points:
            piece, expected = bytes(wire[last:point]), []
            for opcode, payload in reassembler.feed(piece):
                if opcode == OP_TEXT:
                    check_ws(payload, "trade")
                    check_ws(payload, "aggTrade")
                    expected.append(parse_ws_or_bad(payload, "trade"))
            trades, _, _ = parse_socket_read(hot_path, piece, parse_binance_ws, SYMBOL, RTS)
            assert trades == [trade for trade in expected if trade is not None]
            last = point
    except FrameError:
        pass
    sample = reassembler.connection_lost()
    assert sample is None or isinstance(sample, dict)
    for key, value in (sample or {}).items():
        assert key in ("e", "s", "stream", "t", "a", "f", "l")
        assert type(value) is (str if key in ("e", "s", "stream") else int)


@FUZZ
@given(st.binary(max_size=400) | mutated())
def test_sample_of_any_bytes_reports_only_values_it_read(prefix):
    sample = sample_prefix(prefix)
    for key, value in sample.items():
        if isinstance(value, int):
            assert re.search(rb'"%s"\s*:\s*%d\s*[,}\]]' % (re.escape(key.encode()), value), prefix)
        else:
            assert isinstance(value, str)
