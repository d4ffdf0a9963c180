"""The frame reader: any split of a valid stream into chunks gives exactly the original messages."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btcfeed.wsframes import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_TEXT, FrameError, FrameReader

from samples import fragmented, frame

MAX = 1 << 20


messages = st.lists(st.tuples(st.sampled_from([OP_TEXT, OP_BINARY]), st.binary(max_size=70_000),
                              st.lists(st.integers(0, 70_000), max_size=3)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(messages, st.lists(st.integers(1, 200_000), max_size=12), st.booleans())
def test_any_split_gives_the_original_messages(items, cuts, ping_between):
    stream, expected = b"", []
    for opcode, payload, pieces in items:
        stream += fragmented(opcode, payload, pieces)
        expected.append((opcode, payload))
        if ping_between:
            stream += frame(OP_PING, b"hb")
            expected.append((OP_PING, b"hb"))
    reader, got, last = FrameReader(MAX), [], 0
    for cut in sorted(set(c % (len(stream) + 1) for c in cuts)) + [len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert got == expected
    assert reader.dangling == b""


def test_incomplete_tail_is_kept_and_visible():
    reader = FrameReader(MAX)
    data = frame(OP_TEXT, b'{"e":"trade","t":1}') + frame(OP_TEXT, b'{"e":"trade","t":2}')
    assert reader.feed(data[:-5]) == [(OP_TEXT, b'{"e":"trade","t":1}')]
    assert reader.dangling.endswith(b'{"e":"trade","')
    assert reader.feed(data[-5:]) == [(OP_TEXT, b'{"e":"trade","t":2}')]


def test_control_frame_between_fragments():
    reader = FrameReader(MAX)
    data = frame(OP_TEXT, b"ab", fin=False) + frame(OP_PING, b"x") + frame(OP_CONTINUATION, b"cd")
    assert reader.feed(data) == [(OP_PING, b"x"), (OP_TEXT, b"abcd")]


@pytest.mark.parametrize("data, reason", [
    (frame(OP_TEXT, b"x", masked=True), "masked"),
    (frame(OP_CONTINUATION, b"x"), "continuation frame without"),
    (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), "before the previous one"),
    (bytes([0x80 | 0x3, 1]) + b"x", "unknown opcode"),
    (bytes([0xC1, 1]) + b"x", "reserved bits"),
    (frame(OP_PING, b"x", fin=False), "control frame"),
    (bytes([0x81, 127]) + (MAX + 1).to_bytes(8, "big"), "bound"),
    (frame(OP_TEXT, b"a" * 600_000, fin=False) + frame(OP_CONTINUATION, b"b" * 600_000), "bound"),
])
def test_protocol_violations_are_errors(data, reason):
    with pytest.raises(FrameError, match=reason):
        FrameReader(MAX).feed(data)


def test_close_frame_is_handed_over():
    assert FrameReader(MAX).feed(frame(OP_CLOSE, b"\x03\xe8bye")) == [(OP_CLOSE, b"\x03\xe8bye")]


def test_medium_text_frames_take_the_same_bound():
    # The one-frame fast path (2-byte extended length) checks the bound like every other frame.
    with pytest.raises(FrameError, match="bound"):
        FrameReader(100).feed(frame(OP_TEXT, b"x" * 200))
    assert FrameReader(200).feed(frame(OP_TEXT, b"x" * 200)) == [(OP_TEXT, b"x" * 200)]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536])
def test_every_length_encoding_byte_by_byte(size):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = frame(OP_TEXT, payload) + frame(OP_BINARY, payload[:7])
    reader, got = FrameReader(MAX), []
    step = 1 if size < 300 else 4099
    for start in range(0, len(data), step):
        got += reader.feed(data[start:start + step])
    assert got == [(OP_TEXT, payload), (OP_BINARY, payload[:7])]


def test_bytes_of_a_violation_stay_visible_for_the_dead_letter():
    reader = FrameReader(MAX)
    with pytest.raises(FrameError):
        reader.feed(frame(OP_TEXT, b'{"a":1}') + frame(OP_TEXT, b"x", masked=True))
    assert reader.dangling.endswith(frame(OP_TEXT, b"x", masked=True))


def test_a_large_frame_in_tiny_reads_waits_without_reparsing():
    payload = b"y" * 70_000
    data = frame(OP_TEXT, payload)
    reader = FrameReader(MAX)
    assert reader.feed(data[:3]) == [] and reader.buffer_needs == 10      # the 8-byte length first
    assert reader.feed(data[3:12]) == [] and reader.buffer_needs == len(data)
    got = []
    for index in range(12, len(data)):
        got += reader.feed(data[index:index + 1])
    assert got == [(OP_TEXT, payload)] and reader.dangling == b""
