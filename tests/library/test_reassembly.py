"""Reassembly: socket bytes -> websocket messages -> JSON documents, and what a cut message still tells.

Properties: any split of a valid stream gives exactly the original documents in order; a stream cut
at any byte never gives a partial document, and the sample of the cut never reports a value that the
full document does not have.
"""

import json

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from btcfeed.trade import BadMessage, binance_cut_record_id, parse_binance_ws, parse_socket_read
from btcfeed.wsframes import (OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT, FrameError, FrameReader,
                             MessageSplitter, Reassembler, _is_whole_document, sample_prefix)
from samples import fragments_with_pings, frame, split_at

MAX = 1 << 20
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRADE = (b'{"e":"trade","E":1700000000100,"s":"BTCUSDT","t":12345,"p":"43210.01000000","q":"0.00123000",'
         b'"T":1700000000099,"m":true,"M":true}')
COMBINED = b'{"stream":"btcusdt@trade","data":' + TRADE + b'}'

# Strings full of the characters a boundary scan could trip over.
tricky_text = st.text(alphabet=st.sampled_from(list('{}[]"\\/:,\n\t ab\u00e9\u20ac\U0001f600\x00\x1f')),
                      max_size=12)
json_scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | tricky_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(tricky_text, inner, max_size=4), max_leaves=12)
documents = st.dictionaries(tricky_text, json_values, max_size=5) | st.lists(json_values, max_size=5)
separators = st.sampled_from(["", "", "\n", "\r\n", " ", "\t\n  "])


@st.composite
def encoded_document(draw):
    """One document as a server might write it: compact or spaced, ASCII-escaped or not."""
    document = draw(documents)
    style = draw(st.sampled_from(["orjson", "compact", "spaced", "ascii"]))
    if style == "orjson":
        return orjson.dumps(document)
    if style == "compact":
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if style == "spaced":
        return json.dumps(document, indent=draw(st.sampled_from([None, 1]))).encode()
    return json.dumps(document).encode()


@st.composite
def document_stream(draw):
    """Documents and the byte stream that holds them: concatenated, newline-delimited or mixed."""
    docs = draw(st.lists(encoded_document(), min_size=1, max_size=6))
    stream = draw(separators).encode()
    for doc in docs:
        stream += doc + draw(separators).encode()
    return docs, stream


def split_all(pieces) -> list:
    splitter, got = MessageSplitter(MAX), []
    for piece in pieces:
        got += splitter.feed(piece)
    return got, splitter


# --- the splitter -------------------------------------------------------------------------------

@PROPERTY
@given(document_stream(), st.lists(st.integers(0, 10_000), max_size=10))
def test_any_split_of_a_document_stream_gives_the_original_documents(docs_and_stream, cuts):
    docs, stream = docs_and_stream
    got, splitter = split_all(split_at(stream, cuts))
    assert got == docs
    assert splitter.pending == b""
    assert [orjson.loads(doc) for doc in got] == [orjson.loads(doc) for doc in docs]


@PROPERTY
@given(document_stream(), st.integers(0, 10_000), st.lists(st.integers(0, 10_000), max_size=6))
def test_a_cut_stream_gives_only_complete_documents(docs_and_stream, cut, cuts):
    docs, stream = docs_and_stream
    cut_stream = stream[:cut % (len(stream) + 1)]
    got, splitter = split_all(split_at(cut_stream, cuts))
    assert got == docs[:len(got)]
    # What was not handed out is kept, and it is exactly the rest of the cut stream.
    consumed = sum(len(doc) for doc in got)
    rest = cut_stream
    for doc in got:
        rest = rest[rest.index(doc) + len(doc):]
    assert splitter.pending == rest.lstrip(b" \t\r\n")
    assert consumed <= len(cut_stream)
    if len(got) < len(docs):
        assert splitter.pending == b"" or docs[len(got)].startswith(splitter.pending)


def test_concatenated_and_newline_delimited_documents():
    assert MessageSplitter(MAX).feed(TRADE + COMBINED + b"\n" + TRADE + b"\r\n") == [TRADE, COMBINED, TRADE]


def test_a_document_continues_in_the_next_message():
    splitter = MessageSplitter(MAX)
    assert splitter.feed(TRADE + TRADE[:40]) == [TRADE]
    assert splitter.pending == TRADE[:40]
    assert splitter.feed(TRADE[40:]) == [TRADE]
    assert splitter.pending == b""


@pytest.mark.parametrize("doc", [
    b'{"a":"}{"}', b'{"a":"\\"}{\\""}', b'{"a":"\\\\"}', b'["]","[",{"x":"\\\\\\""}]', b'{"a":"\\u007d"}',
    b'[[[[[[[[[[{"deep":"}"}]]]]]]]]]]',
])
def test_quotes_braces_and_escapes_inside_strings(doc):
    for cut in range(len(doc) + 1):
        assert split_all([doc[:cut], doc[cut:], doc])[0] == [doc, doc]


def test_text_that_is_no_document_is_handed_on_for_rejection():
    # Never dropped silently: the parser turns it into a dead letter with a reason.
    splitter = MessageSplitter(MAX)
    assert splitter.feed(b'garbage {"a":1} 42 [1] "x" ') == [b"garbage", b'{"a":1}', b"42", b"[1]", b'"x"']
    assert splitter.feed(b"ab") + splitter.feed(b'c{"a":1}') == [b"ab", b"c", b'{"a":1}']


def test_an_endless_document_is_over_the_bound():
    splitter = MessageSplitter(100)
    splitter.feed(b'{"a":"' + b"x" * 60)
    with pytest.raises(FrameError, match="bound"):
        splitter.feed(b"x" * 60)
    assert splitter.pending == b""


def test_a_long_string_in_tiny_pieces_is_scanned_once():
    # Resuming inside a string (and inside an escape pair) keeps byte-by-byte feeding linear and exact.
    doc = b'{"a":"' + b'\\"x' * 20_000 + b'"}'
    splitter, got = MessageSplitter(MAX), []
    for index in range(len(doc)):
        got += splitter.feed(doc[index:index + 1])
    assert got == [doc]


# --- frames -------------------------------------------------------------------------------------

frame_messages = st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=3000),
                                    st.lists(st.integers(0, 3000), max_size=4), st.booleans()),
                          min_size=1, max_size=6)


@PROPERTY
@given(frame_messages, st.lists(st.integers(0, 30_000), max_size=16))
def test_any_split_of_frames_with_pings_between_fragments_gives_the_original_messages(items, cuts):
    stream, expected = b"", []
    for opcode, payload, pieces, pings in items:
        data, controls = fragments_with_pings(opcode, payload, pieces, pings)
        stream += data
        expected += controls + [(opcode, payload)]
    reader, got = FrameReader(MAX), []
    for piece in split_at(stream, cuts):
        got += reader.feed(piece)
    assert got == expected
    assert reader.dangling == b"" and reader.dangling_payload == b""


@PROPERTY
@given(document_stream(), st.lists(st.integers(0, 10_000), max_size=5),
       st.lists(st.integers(0, 10_000), max_size=5), st.lists(st.integers(0, 30_000), max_size=10))
def test_documents_in_frames_any_split_gives_the_original_documents(docs_and_stream, message_cuts,
                                                                    fragment_cuts, read_cuts):
    """Documents spread over messages, messages over fragments, fragments over socket reads.

    One exception by design: a message that is a whole document by itself ends a pending
    incomplete one (see test_a_cut_message_never_swallows_the_whole_messages_after_it), so
    splits that put a whole document right after an unfinished one are left out here."""
    docs, stream = docs_and_stream
    messages = split_at(stream, message_cuts)
    byte_stream = MessageSplitter(MAX)
    for message in messages:
        assume(not (byte_stream.buf and _is_whole_document(message)))
        byte_stream.feed(message)
    wire = b""
    for message in messages:
        data, _ = fragments_with_pings(OP_TEXT, message, fragment_cuts, pings=True)
        wire += data
    reassembler, got = Reassembler(MAX), []
    for piece in split_at(wire, read_cuts):
        got += [payload for opcode, payload in reassembler.feed(piece) if opcode == OP_TEXT]
    assert got == docs
    assert reassembler.connection_lost() is None
    assert reassembler.partial_seen == 0


def test_dangling_payload_has_no_frame_header():
    reader = FrameReader(MAX)
    data = frame(OP_TEXT, b"ab", fin=False) + frame(OP_PING, b"x") + frame(OP_CONTINUATION, COMBINED)
    assert reader.feed(data[:-10]) == [(OP_PING, b"x")]
    assert reader.dangling_payload == b"ab" + COMBINED[:-10]


def test_dangling_payload_with_a_cut_header_is_what_was_complete():
    reader = FrameReader(MAX)
    long_payload = b"[" + b"1," * 100 + b"1]"
    reader.feed(frame(OP_TEXT, b"ab", fin=False) + frame(OP_CONTINUATION, long_payload)[:3])
    assert reader.dangling_payload == b"ab"


# --- sampling a cut message ---------------------------------------------------------------------

def test_sample_targets_the_cut_trade():
    assert sample_prefix(TRADE[:TRADE.index(b',"p"') + 1]) == {"e": "trade", "s": "BTCUSDT", "t": 12345}
    assert sample_prefix(COMBINED[:-20]) == {"stream": "btcusdt@trade", "e": "trade", "s": "BTCUSDT",
                                             "t": 12345}


@pytest.mark.parametrize("cut_after", [b'"t":', b'"t":1', b'"t":1234', b'"t":12345'])
def test_a_number_at_the_very_end_may_have_lost_digits(cut_after):
    prefix = TRADE[:TRADE.index(cut_after) + len(cut_after)]
    assert "t" not in sample_prefix(prefix)


def test_a_string_without_its_closing_quote_is_not_reported():
    assert sample_prefix(b'{"e":"trade","s":"BTCUS') == {"e": "trade"}


def test_nested_fields_are_not_the_trades():
    kline = (b'{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1,"s":"BTCUSDT",'
             b'"k":{"t":1700000000000,"s":"BTCUSDT","f":100,"L":200,"x":false}}}')
    for cut in range(len(kline) + 1):
        sample = sample_prefix(kline[:cut])
        assert "t" not in sample and "f" not in sample
        assert binance_cut_record_id(sample, "BTCUSDT") is None


def test_sample_of_the_last_document_in_the_prefix():
    second = TRADE.replace(b'"t":12345', b'"t":12346')
    assert sample_prefix(TRADE + second[:-30])["t"] == 12346


def test_duplicate_or_odd_values_are_never_reported():
    assert sample_prefix(b'{"e":"trade","t":1,"t":2,') == {"e": "trade"}
    assert sample_prefix(b'{"e":"trade","t":1.5,"a":-3,"f":"7","l":[1],') == {"e": "trade"}
    assert sample_prefix(b'{"e":"trade","t":0123,') == {"e": "trade"}


def test_escaped_strings_are_decoded():
    assert sample_prefix(b'{"e":"tr\\u0061de","s":"B\\"x","t":5,') == {"e": "trade", "s": 'B"x', "t": 5}


def test_aggregate_trade_sample():
    agg = (b'{"e":"aggTrade","E":1,"s":"BTCUSDT","a":26129,"p":"0.01633102","q":"4.70443515",'
           b'"f":27781,"l":27781,')
    assert sample_prefix(agg) == {"e": "aggTrade", "s": "BTCUSDT", "a": 26129, "f": 27781, "l": 27781}
    assert binance_cut_record_id(sample_prefix(agg), "BTCUSDT", "aggTrade") == 26129
    assert binance_cut_record_id(sample_prefix(agg), "BTCUSDT", "trade") is None


@pytest.mark.parametrize("sample, expected", [
    ({"e": "trade", "s": "BTCUSDT", "t": 12345}, 12345),
    ({"e": "trade", "s": "ETHUSDT", "t": 12345}, None),
    ({"e": "trade", "t": 12345}, None),
    ({"e": "aggTrade", "s": "BTCUSDT", "a": 5}, None),
    ({"e": "trade", "s": "BTCUSDT", "t": 2 ** 53}, None),
    ({"e": "trade", "s": "BTCUSDT"}, None),
    ({}, None), (None, None),
])
def test_cut_record_id(sample, expected):
    assert binance_cut_record_id(sample, "BTCUSDT") == expected


# A trade-like document in one of Binance's two shapes, with fields that may be odd or nested.
field_values = json_values | st.integers(0, 2 ** 60) | st.sampled_from(["trade", "aggTrade", "BTCUSDT"])
trade_keys = st.sampled_from(["e", "E", "s", "t", "a", "f", "l", "p", "q", "T", "m", "M", "k"]) | tricky_text
trade_object = st.dictionaries(trade_keys, field_values, max_size=9)


@st.composite
def binance_shaped(draw):
    body = {k: v for k, v in draw(trade_object).items() if k not in ("stream", "data")}
    if draw(st.booleans()):
        return body, body
    message = {"stream": draw(tricky_text), "data": body}
    for key, value in draw(st.dictionaries(tricky_text, field_values, max_size=2)).items():
        message.setdefault(key, value)
    return message, body


@PROPERTY
@given(st.lists(binance_shaped(), min_size=1, max_size=3), st.integers(0, 10_000), separators)
def test_the_sample_of_a_cut_stream_never_differs_from_the_document(shaped, cut, separator):
    encoded = [json.dumps(message, separators=(",", ":")).encode() if index % 2 else orjson.dumps(message)
               for index, (message, _) in enumerate(shaped)]
    stream = separator.encode().join(encoded)
    cut_stream = stream[:cut % (len(stream) + 1)]
    sample = sample_prefix(cut_stream)
    # The document the sample is about: the last one that had started before the cut.
    starts, position = [], 0
    for doc in encoded:
        position = stream.index(doc, position)
        starts.append(position)
        position += len(doc)
    started = [index for index, start in enumerate(starts) if start < len(cut_stream)]
    if not started:
        assert sample == {}
        return
    message, body = shaped[started[-1]]
    for key, value in sample.items():
        original = message.get(key) if key == "stream" else body.get(key)
        assert value == original and type(value) is type(original), (key, value, original)


@PROPERTY
@given(st.lists(binance_shaped(), min_size=1, max_size=3), st.integers(0, 10_000),
       st.lists(st.integers(0, 10_000), max_size=4))
def test_a_connection_cut_anywhere_yields_complete_documents_and_a_faithful_sample(shaped, cut,
                                                                                  fragment_cuts):
    encoded = [orjson.dumps(message) for message, _ in shaped]
    wire = b"".join(fragments_with_pings(OP_TEXT, doc, fragment_cuts, pings=True)[0] for doc in encoded)
    reassembler = Reassembler(MAX)
    got = [payload for opcode, payload in reassembler.feed(wire[:cut % (len(wire) + 1)]) if opcode == OP_TEXT]
    assert got == encoded[:len(got)]
    sample = reassembler.connection_lost()
    if sample is None:
        assert reassembler.partial_seen == 0
        return
    assert reassembler.partial_seen == 1
    id_field = {"trade": "t", "aggTrade": "a"}.get(sample.get("e"))
    assert reassembler.recovered == int(id_field in sample)
    message, body = shaped[len(got)]
    for key, value in sample.items():
        assert value == (message.get(key) if key == "stream" else body.get(key))


def test_connection_lost_counts_and_resets():
    reassembler = Reassembler(MAX)
    wire = frame(OP_TEXT, TRADE) + frame(OP_TEXT, COMBINED)
    assert reassembler.feed(wire[:-25]) == [(OP_TEXT, TRADE)]
    assert reassembler.connection_lost() == {"stream": "btcusdt@trade", "e": "trade", "s": "BTCUSDT",
                                             "t": 12345}
    assert (reassembler.partial_seen, reassembler.recovered) == (1, 1)
    assert reassembler.connection_lost() is None            # nothing left after the reset
    assert reassembler.feed(frame(OP_TEXT, TRADE)) == [(OP_TEXT, TRADE)]
    reassembler.feed(frame(OP_TEXT, TRADE)[:20])
    assert reassembler.connection_lost() == {"e": "trade"}
    assert (reassembler.partial_seen, reassembler.recovered) == (2, 1)


def test_a_document_cut_between_messages_is_sampled_too():
    reassembler = Reassembler(MAX)
    assert reassembler.feed(frame(OP_TEXT, TRADE + COMBINED[:60])) == [(OP_TEXT, TRADE)]
    assert reassembler.dangling == COMBINED[:60]
    assert reassembler.connection_lost() == {"stream": "btcusdt@trade", "e": "trade"}


def test_control_and_binary_frames_pass_through():
    reassembler = Reassembler(MAX)
    assert reassembler.feed(frame(OP_PING, b"x") + frame(OP_BINARY, b"{}{}")) == [(OP_PING, b"x"),
                                                                                   (OP_BINARY, b"{}{}")]


# --- the hot path: parse first, split only what does not decode ---------------------------------

def parse_or_reason(payload):
    try:
        return parse_binance_ws(payload, "BTCUSDT", 1)
    except BadMessage as exc:
        return str(exc)


def reference_outcome(wire: bytes, reads) -> tuple:
    """What feed() and a parse of every document give: (trades, reject reasons, control frames)."""
    reassembler, trades, rejects, controls = Reassembler(MAX), [], [], []
    for piece in split_at(wire, reads):
        for opcode, payload in reassembler.feed(piece):
            if opcode == OP_BINARY:
                rejects.append(("binary frame", payload))
            elif opcode != OP_TEXT:
                controls.append((opcode, payload))
            else:
                result = parse_or_reason(payload)
                if isinstance(result, str):
                    rejects.append((result, payload))
                elif result is not None:
                    trades.append(result)
    return trades, rejects, controls, reassembler.dangling


@PROPERTY
@given(st.lists(st.sampled_from([TRADE, COMBINED, TRADE.replace(b"12345", b"12346"),
                                 b'{"result":null,"id":1}', b'{"e":"trade"', b"junk", b"  ", b"\n", b'"s"',
                                 b"[1]"]), min_size=1, max_size=12),
       st.lists(st.integers(0, 3000), max_size=6), st.lists(st.integers(0, 3000), max_size=6))
def test_parse_first_gives_what_splitting_everything_gives(parts, message_cuts, reads):
    stream = b"".join(parts)
    wire = b"".join(frame(OP_TEXT, message) for message in split_at(stream, message_cuts))
    wire += frame(OP_PING, b"hb") + frame(OP_BINARY, b"\x00")
    expected = reference_outcome(wire, reads)
    reassembler, trades, rejects, controls = Reassembler(MAX), [], [], []
    for piece in split_at(wire, reads):
        got = parse_socket_read(reassembler, piece, parse_binance_ws, "BTCUSDT", 1)
        trades += got[0]
        rejects += got[1]
        controls += got[2]
    assert trades == expected[0]
    assert controls == expected[2]
    # Garbage is rejected whenever the reference rejects some, and nothing rejected is invented: the
    # rejected text messages, in order, are pieces of what was sent.
    assert bool(rejects) == bool(expected[1])
    rejected = b"".join(raw.strip() for reason, raw in rejects if reason != "binary frame")
    assert is_subsequence(rejected, b"".join(stream.split()))
    if not message_cuts:
        # Whole messages: the same rejects with the same reasons (a whole message may keep its
        # surrounding whitespace), and the same partial document kept for a dropped connection.
        # Garbage cut between messages may be split differently: a quote or brace left open by one
        # message makes the reference's document splitter read the next ones as one document,
        # while the hot path judges each message by itself (an exchange never spreads a document
        # over messages).
        assert reassembler.dangling == expected[3]
        assert ([(reason, raw.strip()) for reason, raw in rejects]
                == [(reason, raw.strip()) for reason, raw in expected[1]])


def is_subsequence(small: bytes, big: bytes) -> bool:
    small = b"".join(small.split())
    found = iter(big)
    return all(byte in found for byte in small)


def envelope(parts, nest: bool) -> bytes:
    body = b"{" + b"".join(parts) + b"}"
    return b'{"stream":"x","data":' + body + b"}" if nest else body


trade_shaped = st.builds(envelope, st.lists(st.sampled_from([b'"', b"{", b"}", b"[", b"]", b"\\", b":", b",",
                                                             b"a", b"1", b'"e":"trade"', b'"s"', b" "]),
                                            max_size=12), st.booleans())


@settings(max_examples=400, deadline=None)
@given(trade_shaped | st.binary(max_size=30))
def test_the_lone_document_shortcut_agrees_with_the_scan(message):
    # The shortcut must never claim a lone document where the bracket scan finds something else.
    from btcfeed.wsframes import _is_lone_trade_shaped_document
    if _is_lone_trade_shaped_document(message):
        scanner = MessageSplitter(MAX)
        documents = []
        scanner._scan(message, 0, documents)
        assert documents == [message] and scanner.pending == b""


def test_recovered_only_when_the_id_of_the_events_own_kind_was_read():
    reassembler = Reassembler(MAX)
    # An older trade event carries the seller's order id as "a": not the record id of a trade.
    reassembler.feed(frame(OP_TEXT, b'{"e":"trade","s":"BTCUSDT","a":50,"t":1234')[:-1])
    assert reassembler.connection_lost() == {"e": "trade", "s": "BTCUSDT", "a": 50}
    reassembler.feed(frame(OP_TEXT, b'{"e":"aggTrade","s":"BTCUSDT","a":26129,"p":"1"}')[:-3])
    assert reassembler.connection_lost()["a"] == 26129
    assert (reassembler.partial_seen, reassembler.recovered) == (2, 1)


def test_other_exchanges_name_their_own_fields():
    message = b'{"type":"match","trade_id":8,"maker_order_id":"x","product_id":"BTC-USD","price":"4'
    sample = sample_prefix(message, string_fields={"type", "product_id"}, id_fields={"trade_id"})
    assert sample == {"type": "match", "trade_id": 8, "product_id": "BTC-USD"}
    reassembler = Reassembler(MAX, {"type", "product_id"}, {"trade_id"}, event_field="type",
                              record_id_fields={"match": "trade_id"})
    reassembler.feed(frame(OP_TEXT, message + b'0"}')[:-3])
    assert reassembler.connection_lost() == sample
    assert reassembler.recovered == 1


def test_a_cut_message_never_swallows_the_whole_messages_after_it():
    """An exchange that sends a truncated message (here the garbage fault's first frame) and then
    carries on: the live trades after it are parsed, the fragment is dead-lettered."""
    trade = (b'{"e":"trade","E":1,"s":"BTCUSDT","t":%d,"p":"43000.01000000","q":"0.00100000",'
             b'"T":1,"m":true,"M":true}')
    wire = frame(OP_TEXT, b'{"e":"trade","s":"BTCUSDT","t":') + b"".join(
        frame(OP_TEXT, trade % i) for i in (7, 8, 9))
    results, rejects, _ = parse_socket_read(Reassembler(1 << 20), wire, parse_binance_ws, "BTCUSDT", 1)
    assert [t.id for t in results] == [7, 8, 9]
    assert [raw for _, raw in rejects] == [b'{"e":"trade","s":"BTCUSDT","t":']
    # A document genuinely continued in the next message is still joined.
    whole = trade % 5
    continued = frame(OP_TEXT, whole[:30]) + frame(OP_TEXT, whole[30:])
    results, rejects, _ = parse_socket_read(Reassembler(1 << 20), continued, parse_binance_ws, "BTCUSDT", 1)
    assert [t.id for t in results] == [5] and rejects == []
