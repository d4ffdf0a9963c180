"""Websocket frames from a byte stream (RFC 6455, server to client), between the socket and the parser.

Reading the socket in large chunks and splitting frames in one loop is several times cheaper per
message than a library call per frame. The reader joins continuation frames into messages, keeps an
incomplete trailing frame across reads, and hands control frames (ping, pong, close) to the caller.
"""

import re
from typing import List, Optional, Tuple

import orjson

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_TEXT, OP_BINARY)


class FrameError(Exception):
    """The stream broke the protocol (or a bound); the connection must be closed and replaced."""


def _frame_bytes_needed(partial) -> int:
    """How many bytes the incomplete frame at the start of partial needs at least (its header first)."""
    if len(partial) < 2:
        return 2
    length = partial[1] & 0x7F
    if length < 126:
        return 2 + length
    header = 4 if length == 126 else 10
    if len(partial) < header:
        return header
    return header + int.from_bytes(partial[2:header], "big")


class FrameReader:
    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self.buffer = bytearray()
        self.buffer_needs = 0       # bytes the buffered incomplete frame needs before it can complete
        self.fragments: List[bytes] = []
        self.fragment_opcode = None
        self.fragment_bytes = 0

    @property
    def dangling(self) -> bytes:
        """What was received of a message not yet complete (for diagnosis when a connection dies)."""
        return b"".join(self.fragments) + bytes(self.buffer)

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Every message and control frame completed by these bytes, in order, as (opcode, payload)."""
        if self.buffer:
            self.buffer += data
            if len(self.buffer) < self.buffer_needs:
                return []           # a large frame arriving in small reads: no copy until it is whole
            data = bytes(self.buffer)
        out = []
        pos, end = 0, len(data)
        max_bytes = self.max_message_bytes
        fragmenting = self.fragment_opcode is not None
        try:
            pos = self._frames(data, pos, end, max_bytes, fragmenting, out)
        except FrameError:
            self.buffer = bytearray(data[pos:])     # kept for the dead letter (see dangling)
            raise
        if pos < end:
            self.buffer = bytearray(data[pos:])
            self.buffer_needs = _frame_bytes_needed(self.buffer)
        else:
            self.buffer = bytearray()
        return out

    def _frames(self, data: bytes, pos: int, end: int, max_bytes: int, fragmenting: bool, out: list) -> int:
        """Frames from data[pos:end] into out; returns where the first incomplete frame starts."""
        while end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            # The common case first: a complete unfragmented text frame of up to 64 KiB, unmasked.
            if first == 0x81 and not fragmenting and second <= 126:
                if second < 126:
                    start = pos + 2
                    stop = start + second
                elif end - pos < 4:
                    break
                else:
                    start = pos + 4
                    stop = start + (data[pos + 2] << 8 | data[pos + 3])
                    if stop - start > max_bytes:
                        raise FrameError(f"frame of {stop - start} bytes is over the {max_bytes}-byte bound")
                if stop > end:
                    break
                out.append((OP_TEXT, data[start:stop]))
                pos = stop
                continue
            if second & 0x80:
                raise FrameError("masked frame from the server")
            if first & 0x70:
                raise FrameError("reserved bits set (no extension was negotiated)")
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
                header = 10
            if length > max_bytes:
                raise FrameError(f"frame of {length} bytes is over the {max_bytes}-byte bound")
            if end - pos < header + length:
                break
            payload = data[pos + header:pos + header + length]
            pos += header + length
            self._frame(first & 0x80, first & 0x0F, payload, out)
            fragmenting = self.fragment_opcode is not None
        return pos

    def _frame(self, fin: int, opcode: int, payload: bytes, out: list) -> None:
        if opcode >= 0x8:               # control frames may arrive between the fragments of a message
            if not fin or len(payload) > 125:
                raise FrameError("fragmented or oversized control frame")
            out.append((opcode, payload))
            return
        if opcode == OP_CONTINUATION:
            if self.fragment_opcode is None:
                raise FrameError("continuation frame without a message to continue")
        elif opcode in DATA_OPCODES:
            if self.fragment_opcode is not None:
                raise FrameError("new message before the previous one was complete")
            if fin:                     # the common case: one frame, one message
                out.append((opcode, payload))
                return
            self.fragment_opcode = opcode
        else:
            raise FrameError(f"unknown opcode {opcode}")
        self.fragments.append(payload)
        self.fragment_bytes += len(payload)
        if self.fragment_bytes > self.max_message_bytes:
            raise FrameError(f"message over the {self.max_message_bytes}-byte bound")
        if fin:
            out.append((self.fragment_opcode, b"".join(self.fragments)))
            self.fragments, self.fragment_opcode, self.fragment_bytes = [], None, 0

    @property
    def dangling_payload(self) -> bytes:
        """The text received of a message not yet complete, without frame headers (for sampling)."""
        partial = self._partial_frame_payload()
        return b"".join(self.fragments) + partial if self.fragments else partial

    def _partial_frame_payload(self) -> bytes:
        buf = self.buffer
        if len(buf) < 2 or buf[0] & 0x0F not in (OP_CONTINUATION, OP_TEXT, OP_BINARY):
            return b""
        length = buf[1] & 0x7F
        header = 2 if length < 126 else 4 if length == 126 else 10
        return bytes(buf[header:]) if len(buf) > header else b""


# --- JSON documents inside text messages --------------------------------------------------------
#
# A text message normally holds one JSON document, but a server may put several in one message
# (concatenated or newline-delimited) and a document may end in a later message. The splitter finds
# top-level object/array boundaries with a byte scan that skips strings (escapes included); it never
# parses JSON, so the parser still sees the exact bytes the exchange sent.

_QUOTE, _BACKSLASH = 0x22, 0x5C
_OPENERS = frozenset(b"{[")
# Non-structural bytes and complete strings: what lies between two brackets of a document. Unrolled
# so that every byte is consumed exactly one way (no backtracking blow-up on hostile input).
_FLAT = rb'[^"{}\[\]]*(?:"[^"\\]*(?:\\.[^"\\]*)*"[^"{}\[\]]*)*'
_SKIP_FLAT = re.compile(_FLAT, re.S)
# The rest of a string whose closing quote has not arrived; never stops inside an escape pair.
_STRING_REST = re.compile(rb'[^"\\]*(?:\\.[^"\\]*)*', re.S)
_WHITESPACE = re.compile(rb'[ \t\r\n]*')
_WHITESPACE_BYTES = b" \t\r\n"
_JUNK = re.compile(rb'[^{\[]*')
_LINE_WINDOW = 4096


def _nested_document_pattern(depth: int) -> bytes:
    # Brackets are counted alike ("{" and "[" open, "}" and "]" close), as the scan loop does, so
    # a match is exactly the document the loop would find; a mismatched pair is the parser's to reject.
    pattern = rb'[{\[]' + _FLAT + rb'[}\]]'
    for _ in range(depth - 1):
        pattern = rb'[{\[]' + _FLAT + rb'(?:' + pattern + _FLAT + rb')*[}\]]'
    return pattern


# One regex call finds a whole document of up to four levels (a combined-stream depth update has
# four); deeper or incomplete documents fall back to the bracket-by-bracket loop.
_DOCUMENT = re.compile(_nested_document_pattern(4), re.S)


def _is_lone_trade_shaped_document(message) -> bool:
    """True only if the scan would find exactly this message as one document; cheaper than the scan.

    Covers the shapes of exchange trade events: one flat object, or one flat object inside another
    ({"stream":..,"data":{..}}). Without a backslash every quote opens or closes a string, so with an
    even number of quotes the last byte lies outside strings; with no other bracket bytes anywhere
    (and, for the nested shape, an even number of quotes before the inner "{"), every bracket is
    structural and the depth returns to zero exactly at the last byte. Anything else: False.
    """
    if not message or message[0] != 0x7B or message[-1] != 0x7D:
        return False
    # "int in bytes" is a plain memchr; a bytes needle would go through a costly conversion first.
    if 0x5C in message or 0x5B in message or 0x5D in message or message.count(0x22) & 1:
        return False
    opened = message.count(0x7B)
    if opened == 1:
        return message.count(0x7D) == 1
    if opened == 2 and message[-2] == 0x7D and message.count(0x7D) == 2:
        return not message.count(0x22, 0, message.find(0x7B, 1)) & 1
    return False


def _is_whole_document(message) -> bool:
    """Whether the message is exactly one complete JSON object or array (whitespace aside)."""
    stripped = bytes(message).strip(_WHITESPACE_BYTES)
    if stripped[:1] not in (b"{", b"["):
        return False
    return MessageSplitter(len(stripped) + 1)._scan_document(stripped, 0) == len(stripped)


class MessageSplitter:
    """Text messages in, complete JSON documents out; an incomplete trailing document waits for more."""

    def __init__(self, max_document_bytes: int):
        self.max_document_bytes = max_document_bytes
        self.buf = bytearray()      # the pending (incomplete) document from its first byte
        self.scan_pos = 0           # where scanning resumes inside buf
        self.depth = 0              # brackets open at scan_pos
        self.in_string = False      # scan_pos is inside a string

    @property
    def pending(self) -> bytes:
        """The incomplete trailing document kept for the next message."""
        return bytes(self.buf)

    def reset(self) -> None:
        self.buf = bytearray()
        self.scan_pos = self.depth = 0
        self.in_string = False

    def feed(self, message) -> List[bytes]:
        """Every document completed by this message, in order, as the exact bytes received."""
        out = []
        self.split_into(message, out)
        return out

    def feed_message(self, message) -> List[bytes]:
        """One websocket message: as feed(), except that a message which is a whole JSON document
        by itself ends a pending incomplete one. That one was a malformed message, not a document
        split across messages; it is handed on as it is (the parser rejects it), so one bad
        message never swallows the live messages after it."""
        out = []
        self.split_message(message, out)
        return out

    def split_message(self, message, out: list) -> None:
        if self.buf and _is_whole_document(message):
            out.append(bytes(self.buf))
            self.reset()
        self.split_into(message, out)

    def split_into(self, message, out: list) -> None:
        if not self.buf:
            if _is_lone_trade_shaped_document(message):     # the common case: one message, one document
                out.append(message)
                return
            self._scan(message, 0, out)
        else:
            self.buf += message
            self._resume(out)

    def _resume(self, out: list) -> None:
        buf = self.buf
        end = self._scan_document(buf, self.scan_pos)
        if end < 0:
            self._check_bound()
            return
        out.append(bytes(buf[:end]))
        rest = bytes(buf[end:])
        self.reset()
        self._scan(rest, 0, out)

    def _scan(self, data, pos: int, out: list) -> None:
        """Documents from data[pos:] into out; an incomplete tail goes into buf."""
        n = len(data)
        while True:
            pos = _WHITESPACE.match(data, pos).end()
            if pos == n:
                return
            if data[pos] in _OPENERS:
                # Newline-delimited documents: a line that is a lone trade-shaped document is exactly
                # what the scan would find from here (the window bounds the search on long lines).
                line_end = data.find(b"\n", pos, pos + _LINE_WINDOW)
                if line_end > pos:
                    line = bytes(data[pos:line_end]).rstrip(_WHITESPACE_BYTES)
                    if _is_lone_trade_shaped_document(line):
                        out.append(line)
                        pos += len(line)
                        continue
                found = _DOCUMENT.match(data, pos)
                if found is not None:
                    out.append(bytes(data[pos:found.end()]))
                    pos = found.end()
                    continue
                self.depth, self.in_string = 0, False
                end = self._scan_document(data, pos)
                if end < 0:
                    self._keep(data, pos)
                    return
                out.append(bytes(data[pos:end]))
                pos = end
            else:
                # Bytes that are no JSON document: handed on whole (up to the next document or the
                # end of the message) so that the parser rejects them with a reason instead of them
                # vanishing here.
                end = _JUNK.match(data, pos).end()
                out.append(bytes(data[pos:end]).rstrip(_WHITESPACE_BYTES))
                pos = end

    def _keep(self, data, start: int) -> None:
        self.buf = bytearray(data[start:])
        self.scan_pos -= start
        self._check_bound()

    def _check_bound(self) -> None:
        if len(self.buf) > self.max_document_bytes:
            size = len(self.buf)
            self.reset()
            raise FrameError(f"JSON document of over {size} bytes is over the "
                             f"{self.max_document_bytes}-byte bound")

    def _scan_document(self, data, pos: int) -> int:
        """The end of the document being scanned, or -1 with scan_pos/depth/in_string saved."""
        n = len(data)
        depth, in_string = self.depth, self.in_string
        while True:
            if in_string:
                pos = _STRING_REST.match(data, pos).end()
                if pos == n or data[pos] != _QUOTE:     # cut inside the string or inside an escape
                    break
                in_string = False
                pos += 1
            pos = _SKIP_FLAT.match(data, pos).end()
            if pos == n:
                break
            byte = data[pos]
            pos += 1
            if byte == _QUOTE:                          # a string whose end has not arrived
                in_string = True
            elif byte in _OPENERS:
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    self.depth, self.in_string = 0, False
                    return pos
        self.depth, self.in_string, self.scan_pos = depth, in_string, pos
        return -1


# --- what can still be read from a document cut off by a lost connection ------------------------

# Fields worth knowing about a cut Binance document: the event type, the symbol, the trade id ("t")
# or the aggregate trade's ids ("a", first to last trade "f".."l"), and the combined stream's name.
# Other exchanges pass their own names (e.g. Coinbase: "type", "product_id" and "trade_id").
SAMPLE_STRING_FIELDS = frozenset(("e", "s", "stream"))
SAMPLE_ID_FIELDS = frozenset(("t", "a", "f", "l"))
# Which field holds the record id, by event type: what makes a sample "recovered".
SAMPLE_EVENT_FIELD = "e"
SAMPLE_RECORD_ID_FIELDS = {"trade": "t", "aggTrade": "a"}
SAMPLE_MAX_BYTES = 1 << 16
_TOKEN = re.compile(
    rb'[ \t\r\n]*(?:'
    rb'("[^"\\]*(?:\\.[^"\\]*)*")'                          # 1: a string, closing quote included
    rb'|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)'  # 2: a number (maybe cut short)
    rb'|(true|false|null)'                                  # 3: a literal
    rb'|([{}\[\]:,]))', re.S)                               # 4: punctuation
_PLAIN_UINT = re.compile(rb'0|[1-9][0-9]*')
_AMBIGUOUS = object()


class _FieldCollector:
    """Key/value pairs of the trade object (the top level, or a combined stream's "data")."""

    def __init__(self):
        self.top, self.data = {}, {}
        self.top_keys = set()

    def put(self, target: dict, key: str, value) -> None:
        # A key seen twice is ambiguous (which one the parser keeps depends on the parser): dropped.
        target[key] = _AMBIGUOUS if key in target else value

    def result(self) -> dict:
        # Binance sends a trade either as the top-level object or, on a combined stream, as
        # {"stream": ..., "data": {...}} with "stream" first. Once "stream" or "data" shows at the
        # top, the trade can only be in "data", whose fields count only if "stream" came first.
        combined = "stream" in self.top_keys or "data" in self.top_keys
        source = self.data if combined else self.top
        fields = {k: v for k, v in source.items() if v is not _AMBIGUOUS and k != "stream"}
        stream = self.top.get("stream")
        if isinstance(stream, str):
            fields["stream"] = stream
        return fields


def sample_prefix(prefix: bytes, string_fields=SAMPLE_STRING_FIELDS, id_fields=SAMPLE_ID_FIELDS) -> dict:
    """Fields that are complete in a cut-off message: of its last document (the one that was cut).

    Only key/value pairs whose value ended inside the prefix count: a string with its closing
    quote, a plain non-negative integer followed by "," "}" or "]" (a number at the very end may
    have lost digits). Only string_fields (as strings) and id_fields (as integers) of the trade
    object: the top level, or "data" of a Binance combined-stream envelope ("stream" first). Never
    a value that the full document would not have; {} when nothing is safe.
    """
    splitter = MessageSplitter(len(prefix) + 1)
    try:
        documents = splitter.feed(prefix)
    except FrameError:
        return {}
    last = splitter.pending or (documents[-1] if documents else b"")
    if not last or last[0] != 0x7B:   # only an object carries named fields
        return {}
    # Exchanges put the identifying fields first; a bounded prefix keeps a hostile giant cheap, and
    # a prefix of a prefix is still safe to sample.
    return _sample_document(last[:SAMPLE_MAX_BYTES], string_fields, id_fields)


# What an open container expects next; any other token ends the sample (the rest is not JSON).
_KEY, _COLON, _VALUE, _COMMA = range(4)


def _sample_document(doc: bytes, string_fields, id_fields) -> dict:
    collected = _FieldCollector()
    stack = []                  # per open container: [is_object, expecting, key]
    data_depth = None
    pending_number = None       # (target, key, value): recorded only once a delimiter follows
    pos, n = 0, len(doc)
    while pos < n:
        token = _TOKEN.match(doc, pos)
        if token is None:
            break               # cut inside a token, or not JSON: nothing after this point counts
        pos = token.end()
        string, number, literal, punct = token.groups()
        if pending_number is not None:
            if punct in (b",", b"}", b"]"):
                collected.put(*pending_number)
            pending_number = None
        if not stack:
            if punct != b"{":
                break
            stack.append([True, _KEY, None])
            continue
        frame = stack[-1]
        is_object, expecting = frame[0], frame[1]
        if punct == b",":
            if expecting != _COMMA:
                break
            frame[1], frame[2] = (_KEY if is_object else _VALUE), None
        elif punct == b":":
            if expecting != _COLON:
                break
            frame[1] = _VALUE
        elif punct in (b"}", b"]"):
            if (punct == b"}") != is_object or expecting not in (_COMMA, _KEY if is_object else _VALUE):
                break
            stack.pop()
            if not stack:
                break           # the document ended
            stack[-1][1] = _COMMA
        elif expecting == _KEY:
            if string is None:
                break
            try:
                frame[2] = orjson.loads(string)
            except orjson.JSONDecodeError:
                break
            frame[1] = _COLON
            if len(stack) == 1:
                collected.top_keys.add(frame[2])
        elif expecting != _VALUE:
            break
        else:                   # a value: a container or a scalar
            frame[1] = _COMMA
            key = frame[2] if is_object else None
            target = _sample_target(collected, len(stack), data_depth)
            wanted = target is not None and (key in id_fields or key in string_fields)
            if punct is not None:
                if wanted:
                    collected.put(target, key, _AMBIGUOUS)      # a container where a value belongs
                if punct == b"{" and len(stack) == 1 and key == "data" and "stream" in collected.top_keys:
                    data_depth = 2
                stack.append([punct == b"{", _KEY if punct == b"{" else _VALUE, None])
            elif not wanted:
                continue
            elif string is not None and key in string_fields:
                try:
                    collected.put(target, key, orjson.loads(string))
                except orjson.JSONDecodeError:
                    break
            elif number is not None and key in id_fields and _PLAIN_UINT.fullmatch(number):
                pending_number = (target, key, int(number))
            else:
                collected.put(target, key, _AMBIGUOUS)          # present but not usable: never guess
    return collected.result()


def _sample_target(collected: _FieldCollector, depth: int, data_depth) -> Optional[dict]:
    if depth == 1:
        return collected.top
    if depth == 2 and data_depth == 2:
        return collected.data
    return None


class Reassembler:
    """Socket bytes in; websocket control frames and the JSON documents of text messages out.

    Binary messages are handed on whole (the caller rejects them). When the connection dies,
    connection_lost() samples what was received of the message that was cut. feed() scans every
    message; common.trade.parse_socket_read() is the cheaper hot path over the same two parts
    (frames, documents): it parses a lone message first and splits only what does not decode.
    """

    def __init__(self, max_message_bytes: int, string_fields=SAMPLE_STRING_FIELDS, id_fields=SAMPLE_ID_FIELDS,
                 event_field: str = SAMPLE_EVENT_FIELD, record_id_fields: dict = None):
        self.frames = FrameReader(max_message_bytes)
        self.documents = MessageSplitter(max_message_bytes)
        self.sample_fields = (string_fields, id_fields)
        self.event_field = event_field
        self.record_id_fields = SAMPLE_RECORD_ID_FIELDS if record_id_fields is None else record_id_fields
        self.partial_seen = 0       # connections lost with part of a message received
        self.recovered = 0          # ... of which the sample named the cut record's id

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Every (opcode, payload) completed by these bytes; a text payload is one JSON document."""
        out = []
        split_into = self.documents.split_message
        for opcode, payload in self.frames.feed(data):
            if opcode == OP_TEXT:
                documents = []
                split_into(payload, documents)
                out.extend((OP_TEXT, document) for document in documents)
            else:
                out.append((opcode, payload))
        return out

    @property
    def dangling(self) -> bytes:
        """The received part of what is not complete yet: a pending document plus an incomplete frame."""
        return self.documents.pending + self.frames.dangling_payload

    def connection_lost(self) -> Optional[dict]:
        """The sample of the cut message (see sample_prefix), or None when nothing was cut; resets."""
        prefix = self.dangling
        self.frames = FrameReader(self.frames.max_message_bytes)
        self.documents.reset()
        if not prefix.strip(_WHITESPACE_BYTES):
            return None
        self.partial_seen += 1
        sample = sample_prefix(prefix, *self.sample_fields)
        if self.record_id_field(sample) in sample:
            self.recovered += 1
        return sample

    def record_id_field(self, sample: dict) -> Optional[str]:
        """The field of the sample that holds the cut record's id, by its event type (None if unknown)."""
        event = sample.get(self.event_field)
        return self.record_id_fields.get(event) if isinstance(event, str) else None
