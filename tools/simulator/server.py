"""Exchange simulator: seeded trades, websocket streams, REST and fault injection on one port.

Run as `python -m tools.simulator --port 0 --port-file PATH [--mode binance|coinbase|kraken]`.
Binance mode (the default) serves the websocket upgrade (`/ws/btcusdt@trade`,
`/stream?streams=btcusdt@trade`, and `@aggTrade` likewise) and REST (`/api/v3/historicalTrades`,
`/api/v3/aggTrades`, ...); each simulated trade is its own aggregate trade (aggregate id = trade id,
first = last = that trade), so one history answers for both kinds. Coinbase mode the Exchange feed (`/`,
`matches` and `heartbeat` channels) and `/products/{id}/trades`; Kraken mode the v2 websocket
(`/v2`, `trade` channel) and `/0/public/Trades`. Every mode has the same seeded trade history, the
same faults and a control API under `/_sim/` for tests, the demo and benchmarks.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import bisect
import collections
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Iterator, Optional

log = logging.getLogger("exchange_sim")

# ---------------------------------------------------------------------------------------------
# Tunables
# ---------------------------------------------------------------------------------------------

DEFAULT_RATE = 20.0
MAX_RATE = 100_000.0
DEFAULT_SEED = 1
DEFAULT_SYMBOL = "BTCUSDT"
DEFAULT_START_ID = 1_000_000
DEFAULT_PING_INTERVAL = 20.0           # Binance pings every 20 s ...
DEFAULT_PONG_TIMEOUT = 60.0            # ... and disconnects after a minute without a pong
DEFAULT_MAX_CONN_SECONDS = 86_400.0    # Binance closes every connection after 24 h
DEFAULT_HISTORY_MAX = 20_000_000
DEFAULT_MAX_SEND_BUFFER = 64 * 1024 * 1024

TICK_SECONDS = 0.005                   # generation granularity; trades of one tick share a timestamp
HOUSEKEEPING_SECONDS = 0.1             # pings, pong timeouts, connection age
MAX_BACKLOG_SECONDS = 1.0              # after a longer event-loop block, skip ahead instead of bursting
CLOSE_GRACE_SECONDS = 2.0              # how long a closing connection may take to flush / answer
HISTORY_CHUNK = 1 << 16                # trades per storage chunk; the oldest chunk is dropped whole
MAX_CLIENT_MESSAGE_BYTES = 1 << 20
MAX_HTTP_BODY_BYTES = 1 << 20

# Price: cents, a reflected random walk around 43,000.00. Quantity: lots of 0.00001 BTC (Binance's
# BTCUSDT step), drawn from a seeded lognormal table so one random draw decides a whole trade.
CENTER_PRICE_CENTS = 4_300_000
PRICE_BAND_CENTS = 50_000
PRICE_STEPS = (0,) * 12 + (1, -1) * 5 + (2, -2) * 2 + (5, -5, 10, -10, 25, -25)
QTY_LOT_UNITS = 1_000                  # one lot in units of 1e-8
QTY_TABLE_BITS = 12
QTY_MEDIAN_LOTS = 50
QTY_SIGMA = 1.6
QTY_MAX_LOTS = 200_000
UNITS_PER_COIN = 100_000_000

# REST (Binance spot request weights and limits).
REST_DEFAULT_LIMIT = 500
REST_MAX_LIMIT = 1000
# The market-data endpoints (the ones rest429 faults refuse); everything else weighs 1.
REST_WEIGHTS = {"/api/v3/historicalTrades": 25, "/api/v3/trades": 25, "/api/v3/aggTrades": 4}
SYMBOL_PATTERN = re.compile(r"^[A-Z0-9\-_.]{1,20}$")
TOO_MANY_REQUESTS_MSG = ("Too many requests; current limit of IP(127.0.0.1) is 6000 request weight per "
                         "1 MINUTE. Please use the websocket for live updates to avoid polling the API.")

# Websocket (RFC 6455).
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_POLICY, CLOSE_TOO_BIG = 1001, 1002, 1008, 1009
FRAGMENTS_PER_MESSAGE = 3

FAULT_KINDS = ("drop", "cut", "stall", "fragment", "rest429", "garbage", "shutdown", "restlag", "fakeid",
               "badrow")
# What a "fakeid" fault sends: a trade, a Coinbase heartbeat, or a trade message cut after its id.
FAKE_ID_FORMS = ("trade", "heartbeat", "cut")
# What the "garbage" fault sends on every connection: none of it may ever become a trade.
GARBAGE_FRAMES = (
    (OP_TEXT, b'{"e":"trade","s":"BTCUSDT","t":'),                                    # malformed JSON
    (OP_TEXT, b'{"hello":"world"}'),                                                  # unknown shape
    (OP_BINARY, b"\x00\x01\x02binary"),                                                # binary frame
    (OP_TEXT, b'{"e":"trade","E":1,"s":"ETHUSDT","t":5,"p":"1.0","q":"1.0","T":1,"m":true,"M":true}'),
    (OP_TEXT, b'{"e":"trade","E":1,"s":"BTCUSDT","t":5,"p":"0.00000000","q":"1.0","T":1,"m":true,"M":true}'),
    (OP_TEXT, b'{"e":"trade","E":1,"s":"BTCUSDT","t":5,"p":"NaN","q":"1.0","T":1,"m":true,"M":true}'),
)
BOOL_TEXT = ("false", "true")
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 404: "Not Found",
                405: "Method Not Allowed", 426: "Upgrade Required", 429: "Too Many Requests",
                431: "Request Header Fields Too Large"}


# ---------------------------------------------------------------------------------------------
# Trades: generation, text, storage
# ---------------------------------------------------------------------------------------------

def price_text(cents: int) -> str:
    """A price in cents as Binance prints it: 8 decimals."""
    return f"{cents // 100}.{cents % 100:02d}000000"


def units_text(units: int) -> str:
    """An amount in units of 1e-8 as an 8-decimal string."""
    return f"{units // UNITS_PER_COIN}.{units % UNITS_PER_COIN:08d}"


def quote_qty_text(cents: int, qty_units: int) -> str:
    # cents * units is in 1e-10; quantities are whole lots (1e-5), so dividing by 100 is exact.
    return units_text(cents * qty_units // 100)


class TradeGenerator:
    """Seeded trade sequence: the k-th trade's price, qty and side depend only on the seed and k."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)
        self.qty_units = self._draw_qty_table()
        self.qty_text = tuple(units_text(units) for units in self.qty_units)
        self._price = CENTER_PRICE_CENTS

    def _draw_qty_table(self) -> tuple[int, ...]:
        mu = math.log(QTY_MEDIAN_LOTS)
        lots = (min(QTY_MAX_LOTS, max(1, round(self._rng.lognormvariate(mu, QTY_SIGMA))))
                for _ in range(1 << QTY_TABLE_BITS))
        return tuple(n * QTY_LOT_UNITS for n in lots)

    def next_batch(self, count: int) -> tuple[array.array, array.array, bytearray]:
        """The next `count` trades as (price cents, qty table index, isBuyerMaker 0/1)."""
        prices, qty_index, sides = array.array("i"), array.array("H"), bytearray()
        add_price, add_qty, add_side = prices.append, qty_index.append, sides.append
        getrandbits, steps = self._rng.getrandbits, PRICE_STEPS
        low, high = CENTER_PRICE_CENTS - PRICE_BAND_CENTS, CENTER_PRICE_CENTS + PRICE_BAND_CENTS
        qty_mask = (1 << QTY_TABLE_BITS) - 1
        price = self._price
        for _ in range(count):
            # One draw per trade: 5 bits of price step, 12 bits of qty, 1 bit of side.
            bits = getrandbits(18)
            step = steps[bits & 31]
            price += step
            if price < low or price > high:
                price -= 2 * step          # reflect at the band so the walk stays around the centre
            add_price(price)
            add_qty((bits >> 5) & qty_mask)
            add_side(bits >> 17)
        self._price = price
        return prices, qty_index, sides


class HistoryChunk:
    """Up to HISTORY_CHUNK consecutive trades, 15 bytes each."""

    __slots__ = ("prices", "qty_index", "times", "sides")

    def __init__(self):
        self.prices = array.array("i")
        self.qty_index = array.array("H")
        self.times = array.array("q")
        self.sides = bytearray()


@dataclass
class TradeSlice:
    """Retained trades first_id.. as parallel sequences (copies, safe to read from another thread)."""
    first_id: int
    prices: array.array
    qty_index: array.array
    times: array.array
    sides: bytes


class TradeHistory:
    """Every generated trade, oldest dropped beyond max_trades, stored in fixed-size chunks."""

    def __init__(self, start_id: int, max_trades: int, chunk_size: int = HISTORY_CHUNK):
        self.max_trades = max_trades
        self.chunk_size = chunk_size
        self.first_id = start_id       # oldest retained id
        self.next_id = start_id        # id the next trade gets
        self._base_id = start_id       # id of the first slot of _chunks[0]
        self._chunks: list[HistoryChunk] = []

    @property
    def last_id(self) -> int:
        return self.next_id - 1

    def append(self, prices: array.array, qty_index: array.array, sides: bytearray, time_ms: int) -> None:
        done, count = 0, len(prices)
        while done < count:
            chunk = self._writable_chunk()
            take = min(count - done, self.chunk_size - len(chunk.prices))
            chunk.prices.extend(prices[done:done + take])
            chunk.qty_index.extend(qty_index[done:done + take])
            chunk.times.extend(array.array("q", (time_ms,)) * take)
            chunk.sides.extend(sides[done:done + take])
            done += take
        self.next_id += count
        self._forget_beyond_bound()

    def _writable_chunk(self) -> HistoryChunk:
        if not self._chunks or len(self._chunks[-1].prices) == self.chunk_size:
            self._chunks.append(HistoryChunk())
        return self._chunks[-1]

    def _forget_beyond_bound(self) -> None:
        self.first_id = max(self.first_id, self.next_id - self.max_trades)
        while self._chunks and self._base_id + self.chunk_size <= self.first_id:
            self._chunks.pop(0)
            self._base_id += self.chunk_size

    def first_id_after_time(self, time_ms: int) -> int:
        """The id of the oldest retained trade printed after time_ms (next_id when there is none);
        times never go backwards along the ids, so each chunk's times are sorted."""
        for index, chunk in enumerate(self._chunks):
            if chunk.times and chunk.times[-1] > time_ms:
                base = self._base_id + index * self.chunk_size
                return max(self.first_id, base + bisect.bisect_right(chunk.times, time_ms))
        return self.next_id

    def slices(self, from_id: int, to_id: int) -> Iterator[TradeSlice]:
        """Retained trades with from_id <= id <= to_id, one slice per chunk touched."""
        from_id, to_id = max(from_id, self.first_id), min(to_id, self.last_id)
        while from_id <= to_id:
            index, offset = divmod(from_id - self._base_id, self.chunk_size)
            chunk = self._chunks[index]
            end = min(self.chunk_size, offset + to_id - from_id + 1, len(chunk.prices))
            yield TradeSlice(from_id, chunk.prices[offset:end], chunk.qty_index[offset:end],
                             chunk.times[offset:end], bytes(chunk.sides[offset:end]))
            from_id += end - offset


# ---------------------------------------------------------------------------------------------
# Websocket framing (server side: frames out unmasked, client frames in masked)
# ---------------------------------------------------------------------------------------------

class ProtocolError(Exception):
    """A client broke RFC 6455; the connection is closed with `code`."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return frame_header(opcode, len(payload), fin) + payload


def encode_message(payload: bytes) -> bytes:
    return frame_header(OP_TEXT, len(payload)) + payload


def encode_fragmented_message(payload: bytes) -> bytes:
    """One text message as a FIN=0 text frame followed by continuation frames."""
    size = max(1, -(-len(payload) // FRAGMENTS_PER_MESSAGE))
    pieces = [payload[start:start + size] for start in range(0, len(payload), size)] or [b""]
    frames = [encode_frame(OP_TEXT if index == 0 else OP_CONTINUATION, piece, fin=index == len(pieces) - 1)
              for index, piece in enumerate(pieces)]
    return b"".join(frames)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


def unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = (mask * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


@dataclass
class ClientFrame:
    fin: bool
    opcode: int
    payload: bytes


async def read_client_frame(reader: asyncio.StreamReader) -> ClientFrame:
    """One frame from the client; raises IncompleteReadError at EOF, ProtocolError when malformed."""
    first, second = await reader.readexactly(2)
    fin, opcode, length = bool(first & 0x80), first & 0x0F, second & 0x7F
    if first & 0x70:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
    if not second & 0x80:
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    if opcode >= OP_CLOSE and (not fin or length > 125):
        raise ProtocolError(CLOSE_PROTOCOL_ERROR, "control frames must be final and short")
    if length > MAX_CLIENT_MESSAGE_BYTES:
        raise ProtocolError(CLOSE_TOO_BIG, "frame too large")
    mask = await reader.readexactly(4)
    return ClientFrame(fin, opcode, unmask(await reader.readexactly(length), mask))


def websocket_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()


# ---------------------------------------------------------------------------------------------
# Outgoing trade messages, built once per tick and shared by every connection
# ---------------------------------------------------------------------------------------------

def trade_payloads(symbol: str, first_id: int, prices: array.array, qty_index: array.array,
                   sides: bytearray, time_ms: int, qty_text: tuple[str, ...]) -> list[bytes]:
    """Binance `trade` events; event time and trade time are both the generation time."""
    head = f'{{"e":"trade","E":{time_ms},"s":"{symbol}","t":'
    time_and_side = f',"T":{time_ms},"m":'
    return [f'{head}{trade_id},"p":"{price_text(cents)}","q":"{qty_text[qty]}"{time_and_side}'
            f'{BOOL_TEXT[side]},"M":true}}'.encode()
            for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]


def agg_trade_payloads(symbol: str, first_id: int, prices: array.array, qty_index: array.array,
                       sides: bytearray, time_ms: int, qty_text: tuple[str, ...]) -> list[bytes]:
    """Binance `aggTrade` events, one per trade: aggregate id, first and last trade id all equal it."""
    head = f'{{"e":"aggTrade","E":{time_ms},"s":"{symbol}","a":'
    return [f'{head}{trade_id},"p":"{price_text(cents)}","q":"{qty_text[qty]}","f":{trade_id},"l":{trade_id},'
            f'"T":{time_ms},"m":{BOOL_TEXT[side]},"M":true}}'.encode()
            for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]


def cut_after_id(message: bytes, record_id: int) -> bytes:
    """The wire bytes of one text message cut where a client can read the record's id and what
    names it (Binance: e, s before t; Coinbase: product_id comes after trade_id), but no more."""
    end = message.index(b",", message.index(b":%d" % record_id)) + 1
    if b'"product_id"' in message:
        end = max(end, message.index(b",", message.index(b'"product_id"')) + 1)
    frame = encode_message(message)
    return frame[:len(frame) - len(message) + end]


class TickFeed:
    """The trades of one tick, encoded lazily for each (combined, fragmented) wire form."""

    def __init__(self, payloads: list[bytes], stream_name: str):
        self._payloads = payloads
        self._combined_prefix = f'{{"stream":"{stream_name}","data":'.encode()
        self._messages: dict[tuple[bool, bool], list[bytes]] = {}
        self._joined: dict[tuple[bool, bool], bytes] = {}

    def messages(self, combined: bool, fragmented: bool) -> list[bytes]:
        """Each trade's complete wire bytes (one or several frames)."""
        key = (combined, fragmented)
        if key not in self._messages:
            payloads = self._payloads
            if combined:
                prefix = self._combined_prefix
                payloads = [prefix + payload + b"}" for payload in payloads]
            encode = encode_fragmented_message if fragmented else encode_message
            self._messages[key] = [encode(payload) for payload in payloads]
        return self._messages[key]

    def joined(self, combined: bool, fragmented: bool) -> bytes:
        key = (combined, fragmented)
        if key not in self._joined:
            self._joined[key] = b"".join(self.messages(combined, fragmented))
        return self._joined[key]


# ---------------------------------------------------------------------------------------------
# One websocket connection
# ---------------------------------------------------------------------------------------------

class WsConnection:
    """Server-side state of one websocket client: subscriptions, pings, injected faults."""

    def __init__(self, transport: asyncio.WriteTransport, peer: str, streams: list[str], combined: bool,
                 now: float, ping_interval: float, max_send_buffer: int):
        self.transport = transport
        self.peer = peer
        self.streams = list(dict.fromkeys(streams))
        self.combined = combined
        self.opened_at = now
        self.next_ping_at = now + ping_interval
        self.awaiting_pong_since: Optional[float] = None
        self.stalled_until = 0.0
        self.cut_pending = False
        self.closing = False               # close frame sent, dropped or cut: nothing more to send
        self._max_send_buffer = max_send_buffer

    def is_stalled(self, now: float) -> bool:
        return now < self.stalled_until

    def pong_overdue(self, now: float, pong_timeout: float) -> bool:
        return self.awaiting_pong_since is not None and now - self.awaiting_pong_since > pong_timeout

    def deliver(self, feed: TickFeed, fragmented: bool, now: float) -> None:
        if self.closing or self.is_stalled(now):
            return                       # a stalled connection never gets this tick's trades
        if self.cut_pending:
            self.cut(feed.messages(self.combined, fragmented)[0])
        else:
            self.send(feed.joined(self.combined, fragmented))

    def send(self, data: bytes) -> None:
        """Queue bytes; a client that lets the buffer grow past the bound is dropped like Binance does."""
        if self.closing or self.transport.is_closing() or self.is_stalled(time.monotonic()):
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > self._max_send_buffer:
            log.warning("dropping slow websocket client %s: more than %d bytes unsent",
                        self.peer, self._max_send_buffer)
            self.closing = True
            self.transport.abort()

    def send_ping(self, now: float) -> None:
        self.send(encode_frame(OP_PING, str(int(time.time() * 1000)).encode()))
        if self.awaiting_pong_since is None:
            self.awaiting_pong_since = now

    def send_close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the transport is closed when the client answers or after a grace."""
        if self.closing or self.transport.is_closing():
            return
        self.transport.write(encode_frame(OP_CLOSE, close_payload(code, reason)))
        self.closing = True
        self._abort_later()

    def drop(self) -> None:
        """Close the TCP connection without a closing handshake (queued whole frames still flush)."""
        if self.transport.is_closing():
            return
        self.closing = True
        self.transport.close()
        self._abort_later()

    def cut(self, message: bytes) -> None:
        """Send the first half of one message's bytes, then close: the client sees a truncated frame."""
        if not self.transport.is_closing():
            self.transport.write(message[:len(message) // 2])
        self.drop()

    def _abort_later(self) -> None:
        asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, self.transport.abort)


# ---------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------

class BadRequest(Exception):
    """An HTTP request that cannot be parsed."""


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    version: str

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    @property
    def wants_websocket(self) -> bool:
        return (self.headers.get("upgrade", "").lower() == "websocket"
                and "upgrade" in self.headers.get("connection", "").lower())


@dataclass
class HttpResponse:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {HTTP_REASONS.get(self.status, 'Unknown')}",
                 "Content-Type: application/json;charset=UTF-8",
                 f"Content-Length: {len(self.body)}",
                 f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def json_response(status: int, obj, headers: Optional[dict[str, str]] = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":")).encode(), headers or {})


def binance_error(status: int, code: int, msg: str, headers: Optional[dict[str, str]] = None) -> HttpResponse:
    return json_response(status, {"code": code, "msg": msg}, headers)


async def read_http_request(reader: asyncio.StreamReader) -> Optional[HttpRequest]:
    """The next request on the connection (body read and discarded), or None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadRequest("incomplete request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise BadRequest("request head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError as exc:
        raise BadRequest(f"bad request line {lines[0][:80]!r}") from exc
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raw_length = headers.get("content-length", "0") or "0"
    if not raw_length.isdigit() or int(raw_length) > MAX_HTTP_BODY_BYTES:
        raise BadRequest(f"bad or too large Content-Length {raw_length[:20]!r}")
    length = int(raw_length)
    if length:
        await reader.readexactly(length)
    parsed = urllib.parse.urlsplit(target)
    query = {name: values[0] for name, values in
             urllib.parse.parse_qs(parsed.query, keep_blank_values=True).items()}
    return HttpRequest(method.upper(), parsed.path, query, headers, version)


class ParamError(Exception):
    """A query parameter that is missing or out of range; the text is shown to the caller."""


def int_param(query: dict[str, str], name: str, default: Optional[int] = None,
              low: Optional[int] = None, high: Optional[int] = None) -> Optional[int]:
    raw = query.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ParamError(f"parameter {name!r} must be an integer, got {raw[:40]!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParamError(f"parameter {name!r} must be within [{low}, {high}], got {value}")
    return value


def float_param(query: dict[str, str], name: str, low: float, high: float) -> float:
    raw = query.get(name, "")
    try:
        value = float(raw)
    except ValueError:
        raise ParamError(f"parameter {name!r} must be a number, got {raw[:40]!r}") from None
    if not low < value <= high:
        raise ParamError(f"parameter {name!r} must be within ({low}, {high}], got {value}")
    return value


def history_rows_json(slices: list[TradeSlice], qty_text: tuple[str, ...],
                      price_format: Callable[[int], str] = price_text) -> bytes:
    """`[[id, price, qty, time, isBuyerMaker], ...]`; pure, so it can run in a worker thread."""
    rows = []
    for part in slices:
        rows.extend(f'[{trade_id},"{price_format(cents)}","{qty_text[qty]}",{ms},{BOOL_TEXT[side]}]'
                    for trade_id, cents, qty, ms, side in
                    zip(itertools.count(part.first_id), part.prices, part.qty_index, part.times, part.sides))
    return ("[" + ",".join(rows) + "]").encode()


# ---------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Optional[str] = None
    rate: float = DEFAULT_RATE
    seed: int = DEFAULT_SEED
    symbol: str = DEFAULT_SYMBOL
    start_id: int = DEFAULT_START_ID
    ping_interval: float = DEFAULT_PING_INTERVAL
    pong_timeout: float = DEFAULT_PONG_TIMEOUT
    max_conn_seconds: float = DEFAULT_MAX_CONN_SECONDS
    history_max: int = DEFAULT_HISTORY_MAX
    max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER
    paused: bool = False
    mode: str = "binance"


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


# ---------------------------------------------------------------------------------------------
# Coinbase Exchange and Kraken v2 modes: the same trade clock, history and faults, their wire shapes
# ---------------------------------------------------------------------------------------------

MODES = ("binance", "coinbase", "kraken")
DEFAULT_SYMBOLS = {"binance": DEFAULT_SYMBOL, "coinbase": "BTC-USD", "kraken": "BTC/USD"}
MODE_SYMBOL_PATTERNS = {
    "binance": SYMBOL_PATTERN,
    "coinbase": re.compile(r"^[A-Z0-9]{2,10}-[A-Z0-9]{2,10}$"),
    "kraken": re.compile(r"^[A-Z0-9]{2,10}/[A-Z0-9]{2,10}$"),
}
HEARTBEAT_SECONDS = 1.0                # Coinbase's heartbeat channel and Kraken v2 beat every second
KRAKEN_TRADES_PER_MESSAGE = 50         # Kraken batches a burst of trades into one message's data
KRAKEN_SNAPSHOT_TRADES = 50
COINBASE_SEQUENCE_OFFSET = 10_000_000_000


def iso_time(ms: int) -> str:
    """ISO-8601 UTC with microseconds, as Coinbase and Kraken v2 print trade times."""
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}000Z"


def short_decimal(text: str) -> str:
    """"43000.10000000" -> "43000.1": the shortest exact form (Kraken v2 sends JSON numbers)."""
    return text.rstrip("0").rstrip(".") if "." in text else text


def coinbase_price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def kraken_price_text(cents: int) -> str:
    return short_decimal(price_text(cents))


def kraken_rest_price_text(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}000"


def kraken_rest_pair(symbol: str) -> str:
    return "".join("XBT" if part == "BTC" else part for part in symbol.split("/"))


def kraken_result_key(symbol: str) -> str:
    """Kraken answers REST with its internal pair name: XXBTZUSD for BTC/USD."""
    base, quote = (("XBT" if part == "BTC" else part) for part in symbol.split("/"))
    return f"X{base}Z{quote}" if len(base) == 3 and len(quote) == 3 else base + quote


def trade_rows(slices: list[TradeSlice]) -> Iterator[tuple[int, int, int, int, int]]:
    """(id, cents, qty index, ms, isBuyerMaker) of every trade in the slices."""
    for part in slices:
        yield from zip(itertools.count(part.first_id), part.prices, part.qty_index, part.times, part.sides)


class CoinbaseProtocol:
    """Coinbase Exchange feed (`matches`, `heartbeat` channels) and GET /products/{id}/trades."""

    trade_stream = "matches"
    garbage_frames = (
        (OP_TEXT, b'{"type":"match","trade_id":'),
        (OP_TEXT, b'{"hello":"world"}'),
        (OP_BINARY, b"\x00\x01\x02binary"),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"1.0","product_id":"ETH-USD",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"0.00","product_id":"%s",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
        (OP_TEXT, b'{"type":"match","trade_id":5,"side":"sell","size":"1.0","price":"NaN","product_id":"%s",'
                  b'"sequence":1,"time":"2026-01-01T00:00:00.000000Z"}'),
    )

    def __init__(self, sim: "ExchangeSimulator"):
        self.sim = sim
        self.product = sim.symbol
        self.rest_path = re.compile(r"^/products/([^/]+)/trades$")
        self.garbage_frames = tuple((op, payload.replace(b"%s", self.product.encode()))
                                    for op, payload in self.garbage_frames)

    # -- websocket
    def accepts_path(self, path: str) -> bool:
        return path in ("", "/")

    def greeting(self, conn: WsConnection) -> list[bytes]:
        return []

    def match(self, kind: str, trade_id: int, cents: int, qty: int, side: int, ms: int) -> bytes:
        qty_text = self.sim.generator.qty_text[qty]
        maker = "buy" if side else "sell"        # isBuyerMaker: the resting order was the buy
        return (f'{{"type":"{kind}","trade_id":{trade_id},"maker_order_id":"{trade_id:032x}",'
                f'"taker_order_id":"{trade_id + 1:032x}","side":"{maker}","size":"{qty_text}",'
                f'"price":"{coinbase_price_text(cents)}","product_id":"{self.product}",'
                f'"sequence":{trade_id + COINBASE_SEQUENCE_OFFSET},"time":"{iso_time(ms)}"}}').encode()

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        return [self.match("match", trade_id, cents, qty, side, time_ms)
                for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]

    def heartbeat(self, last_id: Optional[int] = None) -> bytes:
        last_id = self.sim.history.last_id if last_id is None else last_id
        return (f'{{"type":"heartbeat","sequence":{last_id + COINBASE_SEQUENCE_OFFSET},"last_trade_id":{last_id},'
                f'"product_id":"{self.product}","time":"{iso_time(time.time_ns() // 1_000_000)}"}}').encode()

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        try:
            request = json.loads(message)
        except ValueError:
            return [self.error("Failed to parse request", "malformed JSON")]
        if not isinstance(request, dict) or request.get("type") not in ("subscribe", "unsubscribe"):
            return [self.error("Failed to subscribe", "type must be subscribe or unsubscribe")]
        products = request.get("product_ids", [])
        channels = [c if isinstance(c, str) else c.get("name") if isinstance(c, dict) else None
                    for c in request.get("channels", [])]
        if not isinstance(products, list) or any(p != self.product for p in products):
            return [self.error("Failed to subscribe", f"{str(products)[:40]} is not a valid product")]
        if request["type"] == "unsubscribe":
            conn.streams = [s for s in conn.streams if s not in channels]
            return [self.subscriptions(conn)]
        new_matches = "matches" in channels and "matches" not in conn.streams
        conn.streams.extend(c for c in channels if c in ("matches", "heartbeat") and c not in conn.streams)
        replies = [self.subscriptions(conn)]
        history = self.sim.history
        if new_matches and history.last_id >= history.first_id:
            # Coinbase starts a matches subscription with the product's newest trade.
            (row,) = trade_rows(list(history.slices(history.last_id, history.last_id)))
            trade_id, cents, qty, ms, side = row
            replies.append(self.match("last_match", trade_id, cents, qty, side, ms))
        return replies

    def subscriptions(self, conn: WsConnection) -> bytes:
        return json.dumps({"type": "subscriptions", "channels": [
            {"name": name, "product_ids": [self.product]} for name in conn.streams]},
            separators=(",", ":")).encode()

    @staticmethod
    def error(message: str, reason: str) -> bytes:
        return json.dumps({"type": "error", "message": message, "reason": reason}, separators=(",", ":")).encode()

    # -- REST
    def rest_handler(self, path: str) -> Optional[Handler]:
        return self.rest_trades if self.rest_path.match(path) else None

    async def rest_trades(self, request: HttpRequest) -> HttpResponse:
        sim = self.sim
        if sim.rest429_remaining > 0:
            sim.rest429_remaining -= 1
            return json_response(429, {"message": "Public rate limit exceeded"})
        product = urllib.parse.unquote(self.rest_path.match(request.path).group(1))
        if product != self.product:
            return json_response(404, {"message": "NotFound"})
        try:
            limit = int_param(request.query, "limit", REST_MAX_LIMIT, low=1, high=REST_MAX_LIMIT)
            before = int_param(request.query, "before", None, low=0)
            after = int_param(request.query, "after", None, low=0)
        except ParamError as exc:
            return json_response(400, {"message": str(exc)})
        history, visible = sim.history, sim.rest_last_id()
        if after is not None:                     # older than `after`: the page ending just below it
            newest = min(after - 1, visible)
            oldest = max(newest - limit + 1, history.first_id)
        elif before is not None:                  # newer than `before`: the page starting just above it
            oldest = max(before + 1, history.first_id)
            newest = min(oldest + limit - 1, visible)
        else:
            newest = visible
            oldest = max(newest - limit + 1, history.first_id)
        qty_text = sim.generator.qty_text
        rows = [{"time": iso_time(ms), "trade_id": trade_id,
                 "price": "NaN" if trade_id in sim.bad_rest_ids else coinbase_price_text(cents),
                 "size": qty_text[qty], "side": "buy" if side else "sell"}
                for trade_id, cents, qty, ms, side in trade_rows(list(history.slices(oldest, newest)))]
        rows.reverse()                            # newest first
        headers = {"CB-BEFORE": str(rows[0]["trade_id"]), "CB-AFTER": str(rows[-1]["trade_id"])} if rows else {}
        return json_response(200, rows, headers)

    # -- control API
    def history_price(self, cents: int) -> str:
        return coinbase_price_text(cents)

    def history_qty_texts(self) -> tuple[str, ...]:
        return self.sim.generator.qty_text


class KrakenProtocol:
    """Kraken v2 websocket (`trade` channel, JSON numbers) and GET /0/public/Trades."""

    trade_stream = "trade"
    garbage_frames = (
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":'),
        (OP_TEXT, b'{"hello":"world"}'),
        (OP_BINARY, b"\x00\x01\x02binary"),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"ETH/USD","side":"buy","price":1.5,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":0.0,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":NaN,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
        (OP_TEXT, b'{"channel":"trade","type":"update","data":[{"symbol":"%s","side":"buy","price":4.3e4,'
                  b'"qty":1.0,"ord_type":"market","trade_id":5,"timestamp":"2026-01-01T00:00:00.000000Z"}]}'),
    )

    def __init__(self, sim: "ExchangeSimulator"):
        self.sim = sim
        self.symbol = sim.symbol
        self.pair = kraken_rest_pair(sim.symbol)
        self.result_key = kraken_result_key(sim.symbol)
        self.qty_short = tuple(short_decimal(text) for text in sim.generator.qty_text)
        self.garbage_frames = tuple((op, payload.replace(b"%s", self.symbol.encode()))
                                    for op, payload in self.garbage_frames)
        self._connection_ids = itertools.count(1)

    # -- websocket
    def accepts_path(self, path: str) -> bool:
        return path in ("/v2", "/v2/", "", "/")

    def greeting(self, conn: WsConnection) -> list[bytes]:
        return [json.dumps({"channel": "status", "type": "update", "data": [
            {"api_version": "v2", "connection_id": next(self._connection_ids), "system": "online",
             "version": "2.0.0"}]}, separators=(",", ":")).encode()]

    def trade_item(self, trade_id: int, cents: int, qty: int, side: int, ms: int) -> str:
        taker = "sell" if side else "buy"           # isBuyerMaker: the taker sold
        return (f'{{"symbol":"{self.symbol}","side":"{taker}","price":{kraken_price_text(cents)},'
                f'"qty":{self.qty_short[qty]},"ord_type":"market","trade_id":{trade_id},'
                f'"timestamp":"{iso_time(ms)}"}}')

    def message(self, kind: str, items: list[str]) -> bytes:
        return f'{{"channel":"trade","type":"{kind}","data":[{",".join(items)}]}}'.encode()

    def tick_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        items = [self.trade_item(trade_id, cents, qty, side, time_ms)
                 for trade_id, cents, qty, side in zip(itertools.count(first_id), prices, qty_index, sides)]
        return [self.message("update", items[start:start + KRAKEN_TRADES_PER_MESSAGE])
                for start in range(0, len(items), KRAKEN_TRADES_PER_MESSAGE)]

    def heartbeat(self) -> bytes:
        return b'{"channel":"heartbeat"}'

    def answer(self, conn: WsConnection, message: bytes) -> list[bytes]:
        now = iso_time(time.time_ns() // 1_000_000)
        try:
            request = json.loads(message)
        except ValueError:
            return [self.error(None, "EGeneral:Invalid arguments", now)]
        if not isinstance(request, dict):
            return [self.error(None, "EGeneral:Invalid arguments", now)]
        method, params = request.get("method"), request.get("params") or {}
        if method == "ping":
            return [json.dumps({"method": "pong", "time_in": now, "time_out": now}).encode()]
        if method not in ("subscribe", "unsubscribe") or not isinstance(params, dict):
            return [self.error(method, "EGeneral:Invalid arguments", now)]
        if params.get("channel") != "trade":
            return [self.error(method, f"Channel {str(params.get('channel'))[:20]} not supported here", now)]
        symbols = params.get("symbol")
        if not isinstance(symbols, list) or symbols != [self.symbol]:
            return [self.error(method, f"Currency pair not supported {str(symbols)[:40]}", now)]
        if method == "unsubscribe":
            conn.streams = [s for s in conn.streams if s != self.trade_stream]
        elif self.trade_stream not in conn.streams:
            conn.streams.append(self.trade_stream)
        replies = [json.dumps({"method": method, "result": {"channel": "trade", "snapshot": bool(
            params.get("snapshot", True)), "symbol": self.symbol}, "success": True, "time_in": now,
            "time_out": now}, separators=(",", ":")).encode()]
        if method == "subscribe" and params.get("snapshot", True):
            history = self.sim.history
            rows = trade_rows(list(history.slices(history.last_id - KRAKEN_SNAPSHOT_TRADES + 1, history.last_id)))
            items = [self.trade_item(trade_id, cents, qty, side, ms) for trade_id, cents, qty, ms, side in rows]
            replies.append(self.message("snapshot", items))
        return replies

    @staticmethod
    def error(method, text: str, now: str) -> bytes:
        return json.dumps({"error": text, "method": method, "success": False, "time_in": now, "time_out": now},
                          separators=(",", ":")).encode()

    # -- REST
    def rest_handler(self, path: str) -> Optional[Handler]:
        return self.rest_trades if path == "/0/public/Trades" else None

    async def rest_trades(self, request: HttpRequest) -> HttpResponse:
        sim = self.sim
        if sim.rest429_remaining > 0:
            sim.rest429_remaining -= 1
            return json_response(200, {"error": ["EGeneral:Too many requests"]})
        if request.query.get("pair") not in (self.pair, self.symbol, self.result_key):
            return json_response(200, {"error": ["EQuery:Unknown asset pair"]})
        try:
            count = int_param(request.query, "count", REST_MAX_LIMIT, low=1, high=REST_MAX_LIMIT)
            since = int_param(request.query, "since", None, low=0)
        except ParamError:
            return json_response(200, {"error": ["EGeneral:Invalid arguments"]})
        history, visible = sim.history, sim.rest_last_id()
        if since is None:                          # the newest `count` trades
            oldest = max(history.first_id, visible - count + 1)
        else:                                      # trades after `since` (ns), oldest first
            oldest = history.first_id_after_time(since // 1_000_000)
        rows = [["NaN" if trade_id in sim.bad_rest_ids else kraken_rest_price_text(cents),
                 sim.generator.qty_text[qty], RawJson(f"{ms // 1000}.{ms % 1000:03d}"), "s" if side else "b",
                 "m", "", trade_id]
                for trade_id, cents, qty, ms, side in
                trade_rows(list(history.slices(oldest, min(visible, oldest + count - 1))))]
        last = rows[-1][2].text.replace(".", "") + "000000" if rows else str(since or 0)
        body = {"error": [], "result": {self.result_key: rows, "last": last}}
        return HttpResponse(200, dumps_with_raw(body).encode())

    # -- control API
    def history_price(self, cents: int) -> str:
        return kraken_price_text(cents)

    def history_qty_texts(self) -> tuple[str, ...]:
        return self.qty_short


class RawJson:
    """A JSON number written exactly as given (Kraken REST times like 1688669597.827)."""

    def __init__(self, text: str):
        self.text = text


def dumps_with_raw(obj) -> str:
    if isinstance(obj, RawJson):
        return obj.text
    if isinstance(obj, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps_with_raw(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(dumps_with_raw(v) for v in obj) + "]"
    return json.dumps(obj)


PROTOCOLS = {"coinbase": CoinbaseProtocol, "kraken": KrakenProtocol}



class ExchangeSimulator:
    """One symbol's trade clock, its history, websocket subscribers, REST and the control API."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.symbol = config.symbol
        self.trade_stream = f"{config.symbol.lower()}@trade"
        # Binance mode also serves aggregate trades; the other modes have one trade channel.
        self.agg_stream: Optional[str] = f"{config.symbol.lower()}@aggTrade"
        self.generator = TradeGenerator(config.seed)
        self.history = TradeHistory(config.start_id, config.history_max)
        # None in Binance mode, whose wire shapes are the simulator's own code below.
        self.protocol = PROTOCOLS[config.mode](self) if config.mode in PROTOCOLS else None
        if self.protocol is not None:
            self.trade_stream = self.protocol.trade_stream
            self.agg_stream = None
        self._next_heartbeat = 0.0
        self.connections: set[WsConnection] = set()
        self._client_writers: dict[asyncio.Task, asyncio.StreamWriter] = {}   # every open TCP client
        self.rate = config.rate
        self.paused = config.paused
        self.generated = 0
        self.fragmented = False
        self.rest429_remaining = 0
        self.rest_lag_ms = 0               # REST shows only trades at least this old ("restlag")
        self.bad_rest_ids: set[int] = set()   # ids whose REST rows carry a NaN price ("badrow")
        self.rest_calls: collections.Counter = collections.Counter()   # REST requests by path
        self._weight_minute = -1
        self._weight_used = 0
        self._schedule_start = time.monotonic()
        self._scheduled_done = 0
        self._next_housekeeping = 0.0
        self.stopping = asyncio.Event()
        self._routes: dict[str, tuple[str, Handler]] = {
            "/api/v3/ping": ("GET", self.rest_ping),
            "/api/v3/time": ("GET", self.rest_time),
            "/api/v3/historicalTrades": ("GET", self.rest_historical_trades),
            "/api/v3/aggTrades": ("GET", self.rest_agg_trades),
            "/api/v3/trades": ("GET", self.rest_recent_trades),
            "/_sim/status": ("GET", self.control_status),
            "/_sim/pause": ("POST", self.control_pause),
            "/_sim/resume": ("POST", self.control_resume),
            "/_sim/rate": ("POST", self.control_rate),
            "/_sim/history": ("GET", self.control_history),
            "/_sim/fault": ("POST", self.control_fault),
            "/_sim/traffic": ("GET", self.control_traffic),
        }

    # -- the trade clock ------------------------------------------------------------------------

    def restart_schedule(self, now: float) -> None:
        self._schedule_start, self._scheduled_done = now, 0

    async def run_clock(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            self.generate_due_trades(now)
            if now >= self._next_housekeeping:
                self._next_housekeeping = now + HOUSEKEEPING_SECONDS
                self.housekeep(now)

    def generate_due_trades(self, now: float) -> None:
        if self.paused:
            return
        # Counting against the schedule start (not per tick) keeps fractional rates exact.
        due = int(self.rate * (now - self._schedule_start)) - self._scheduled_done
        if due <= 0:
            return
        backlog_limit = max(1, int(self.rate * MAX_BACKLOG_SECONDS))
        if due > backlog_limit:
            # The loop was blocked for a long time: emit one second's worth and start the schedule
            # again from now, rather than bursting everything owed.
            log.warning("trade clock fell %.2f s behind; skipping ahead", due / self.rate)
            self.restart_schedule(now)
            self.emit_trades(backlog_limit)
            return
        self._scheduled_done += due
        self.emit_trades(due)

    def emit_trades(self, count: int) -> None:
        time_ms = time.time_ns() // 1_000_000
        prices, qty_index, sides = self.generator.next_batch(count)
        first_id = self.history.next_id
        self.history.append(prices, qty_index, sides, time_ms)
        self.generated += count
        tick = (first_id, prices, qty_index, sides, time_ms)
        self.deliver_tick(self.trade_stream, self.trade_payloads, tick)
        if self.agg_stream is not None:
            self.deliver_tick(self.agg_stream, self.agg_trade_payloads, tick)

    def deliver_tick(self, stream: str, make_payloads: Callable[..., list[bytes]], tick: tuple) -> None:
        """One tick's trades to the connections on this stream (encoded only when someone listens)."""
        listeners = [conn for conn in self.connections if stream in conn.streams]
        if not listeners:
            return
        feed = TickFeed(make_payloads(*tick), stream)
        now = time.monotonic()
        for conn in listeners:
            conn.deliver(feed, self.fragmented, now)
            if conn.closing:
                self.connections.discard(conn)

    def trade_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        if self.protocol is not None:
            return self.protocol.tick_payloads(first_id, prices, qty_index, sides, time_ms)
        return trade_payloads(self.symbol, first_id, prices, qty_index, sides, time_ms,
                              self.generator.qty_text)

    def agg_trade_payloads(self, first_id: int, prices, qty_index, sides, time_ms: int) -> list[bytes]:
        return agg_trade_payloads(self.symbol, first_id, prices, qty_index, sides, time_ms,
                                  self.generator.qty_text)

    def housekeep(self, now: float) -> None:
        config = self.config
        if self.protocol is not None and now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_SECONDS
            self.send_heartbeats()
        for conn in list(self.connections):
            if conn.closing:
                self.connections.discard(conn)
            elif conn.is_stalled(now):
                continue
            elif now - conn.opened_at > config.max_conn_seconds:
                log.info("closing %s: connection older than %.0f s", conn.peer, config.max_conn_seconds)
                self.close_connection(conn, CLOSE_GOING_AWAY, "connection lifetime exceeded")
            elif conn.pong_overdue(now, config.pong_timeout):
                log.info("closing %s: no pong within %.1f s", conn.peer, config.pong_timeout)
                self.close_connection(conn, CLOSE_POLICY, "pong timeout")
            elif now >= conn.next_ping_at:
                conn.next_ping_at = now + config.ping_interval
                conn.send_ping(now)

    def send_heartbeats(self) -> None:
        """Coinbase and Kraken beat every second on subscribed connections (a stalled one gets none)."""
        frame = encode_message(self.protocol.heartbeat())
        for conn in self.connections:
            if self.trade_stream in conn.streams or "heartbeat" in conn.streams:
                conn.send(frame)

    def close_connection(self, conn: WsConnection, code: int, reason: str) -> None:
        self.connections.discard(conn)
        conn.send_close(code, reason)

    # -- faults ------------------------------------------------------------------------------

    def inject_fault(self, kind: str, query: dict[str, str]) -> None:
        conns = list(self.connections)
        if kind == "drop":
            for conn in conns:
                self.connections.discard(conn)
                conn.drop()
        elif kind == "cut":
            for conn in conns:
                conn.cut_pending = True
        elif kind == "stall":
            until = time.monotonic() + float_param(query, "seconds", 0.0, 3600.0)
            for conn in conns:
                conn.stalled_until = until
        elif kind == "fragment":
            on = query.get("on", "1")
            if on not in ("0", "1"):
                raise ParamError("parameter 'on' must be 1 or 0")
            self.fragmented = on == "1"
        elif kind == "rest429":
            self.rest429_remaining = int_param(query, "count", 1, low=0, high=1_000_000)
        elif kind == "shutdown":
            # Binance's maintenance notice, then the close a little later (seconds=...).
            delay = float_param(query, "seconds", 0.0, 3600.0) if "seconds" in query else 2.0
            notice = {"e": "serverShutdown", "E": int(time.time() * 1000)}
            loop = asyncio.get_running_loop()
            for conn in conns:
                body = {"stream": conn.streams[0], "data": notice} if conn.combined and conn.streams else notice
                conn.send(encode_frame(OP_TEXT, json.dumps(body, separators=(",", ":")).encode()))
                loop.call_later(delay, self.close_connection, conn, 1001, "server shutdown")
        elif kind == "restlag":
            # REST answers from a replica that is this far behind the live feed.
            self.rest_lag_ms = max(0, int(float_param(query, "seconds", -1.0, 3600.0) * 1000))
        elif kind == "badrow":
            if not query.get("id"):
                raise ParamError("parameter 'id' (the trade id whose REST rows turn invalid) is required")
            self.bad_rest_ids.add(int_param(query, "id", None, low=0))
        elif kind == "fakeid":
            self.send_fake_id(conns, int_param(query, "ahead", 1_000_000_000, low=1, high=2 ** 52),
                              query.get("form", "trade"))
        elif kind == "garbage":
            frames = GARBAGE_FRAMES if self.protocol is None else self.protocol.garbage_frames
            junk = b"".join(encode_frame(opcode, payload) for opcode, payload in frames)
            for conn in conns:
                conn.send(junk)
        else:
            raise ParamError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
        log.info("fault injected: %s %s on %d connection(s)", kind,
                 {k: v for k, v in query.items() if k != "kind"}, len(conns))

    def send_fake_id(self, conns: list[WsConnection], ahead: int, form: str) -> None:
        """One record naming an id `ahead` of the newest trade, which never exists in the history:
        a forged trade, a Coinbase heartbeat naming it, or a trade message cut right after its id
        (the connection then drops)."""
        if form not in FAKE_ID_FORMS or (form == "heartbeat" and self.config.mode != "coinbase"):
            raise ParamError(f"parameter 'form' must be one of {', '.join(FAKE_ID_FORMS)} "
                             "(heartbeat in coinbase mode only)")
        if form == "cut" and self.config.mode == "kraken":
            raise ParamError("a cut Kraken message names no id; use form=trade")
        fake_id = self.history.last_id + ahead
        prices, qty_index, sides = array.array("i", [CENTER_PRICE_CENTS]), array.array("H", [0]), bytearray(1)
        now_ms = time.time_ns() // 1_000_000
        if form == "heartbeat":
            payload = self.protocol.heartbeat(fake_id)
        else:
            payload = self.trade_payloads(fake_id, prices, qty_index, sides, now_ms)[0]
        for conn in conns:
            if conn.closing or self.trade_stream not in conn.streams:
                continue
            message = payload
            if conn.combined:
                message = f'{{"stream":"{self.trade_stream}","data":'.encode() + payload + b"}"
            if form == "cut":
                self.connections.discard(conn)
                conn.transport.write(cut_after_id(message, fake_id))
                conn.drop()
            else:
                conn.send(encode_message(message))
        log.info("fake id %d (%s, %d ahead of %d)", fake_id, form, ahead, self.history.last_id)

    # -- serving -----------------------------------------------------------------------------

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "%s:%s" % writer.get_extra_info("peername")[:2]
        handler = asyncio.current_task()
        self._client_writers[handler] = writer
        try:
            while True:
                request = await read_http_request(reader)
                if request is None:
                    break
                if request.wants_websocket:
                    await self.serve_websocket(request, reader, writer, peer)
                    break
                response = await self.route(request)
                writer.write(response.encode(request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    break
        except BadRequest as exc:
            writer.write(json_response(400, {"ok": False, "error": str(exc)}).encode(keep_alive=False))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass                           # the client went away; nothing to answer
        except asyncio.CancelledError:
            # Only at shutdown, for a client that outlived the grace period. Python 3.11's stream
            # callback reports a cancelled handler as an error, so end it as a normal return.
            pass
        finally:
            self._client_writers.pop(handler, None)
            writer.close()

    async def route(self, request: HttpRequest) -> HttpResponse:
        exchange_handler = self.protocol.rest_handler(request.path) if self.protocol is not None else None
        if exchange_handler is not None:
            if request.method != "GET":
                return json_response(405, {"message": f"Use GET for {request.path}"})
            return await exchange_handler(request)
        if request.path not in self._routes:
            return json_response(404, {"code": -1, "msg": f"Not found: {request.path[:100]}"})
        method, handler = self._routes[request.path]
        if request.method != method:
            return json_response(405, {"code": -1, "msg": f"Use {method} for {request.path}"})
        try:
            return await handler(request)
        except ParamError as exc:
            return json_response(400, {"ok": False, "error": str(exc)})

    async def serve_websocket(self, request: HttpRequest, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter, peer: str) -> None:
        subscription = self.parse_stream_path(request)
        key = request.headers.get("sec-websocket-key", "")
        if subscription is None:
            writer.write(json_response(404, {"code": -1, "msg": "Not found"}).encode(keep_alive=False))
            return
        if request.headers.get("sec-websocket-version") != "13" or not key:
            response = json_response(426, {"code": -1, "msg": "websocket version 13 and a key are required"},
                                     {"Sec-WebSocket-Version": "13"})
            writer.write(response.encode(keep_alive=False))
            return
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n\r\n").encode())
        streams, combined = subscription
        conn = WsConnection(writer.transport, peer, streams, combined, time.monotonic(),
                            self.config.ping_interval, self.config.max_send_buffer)
        self.connections.add(conn)
        log.info("websocket %s opened %s streams=%s", peer, request.path, conn.streams)
        if self.protocol is not None:
            for payload in self.protocol.greeting(conn):
                conn.send(encode_message(payload))
        try:
            await self.read_websocket(conn, reader)
        except ProtocolError as exc:
            log.info("websocket %s protocol error: %s", peer, exc.reason)
            conn.send_close(exc.code, exc.reason)
        finally:
            self.connections.discard(conn)
            log.info("websocket %s closed", peer)

    def parse_stream_path(self, request: HttpRequest) -> Optional[tuple[list[str], bool]]:
        """(stream names, combined?) for `/ws/a/b` or `/stream?streams=a/b`; None for other paths.
        Coinbase and Kraken connections start without streams: the client subscribes by message."""
        if self.protocol is not None:
            return ([], False) if self.protocol.accepts_path(request.path) else None
        if request.path == "/ws" or request.path.startswith("/ws/"):
            return [name for name in request.path[4:].split("/") if name], False
        if request.path == "/stream":
            return [name for name in request.query.get("streams", "").split("/") if name], True
        return None

    async def read_websocket(self, conn: WsConnection, reader: asyncio.StreamReader) -> None:
        fragments: list[bytes] = []
        while True:
            frame = await read_client_frame(reader)
            if frame.opcode == OP_CLOSE:
                if not conn.closing:
                    # Echo the client's status code, as RFC 6455 section 5.5.1 asks.
                    conn.transport.write(encode_frame(OP_CLOSE, frame.payload[:2]))
                conn.closing = True
                conn.transport.close()
                return
            if frame.opcode == OP_PING:
                conn.send(encode_frame(OP_PONG, frame.payload))
            elif frame.opcode == OP_PONG:
                conn.awaiting_pong_since = None
            elif frame.opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
                if (frame.opcode == OP_CONTINUATION) != bool(fragments):
                    raise ProtocolError(CLOSE_PROTOCOL_ERROR, "unexpected continuation state")
                fragments.append(frame.payload)
                if sum(map(len, fragments)) > MAX_CLIENT_MESSAGE_BYTES:
                    raise ProtocolError(CLOSE_TOO_BIG, "message too large")
                if frame.fin:
                    self.answer_client_request(conn, b"".join(fragments))
                    fragments = []
            else:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {frame.opcode}")

    def answer_client_request(self, conn: WsConnection, message: bytes) -> None:
        """Binance's live subscription methods: SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS (or the
        other mode's subscribe messages)."""
        if self.protocol is not None:
            for reply in self.protocol.answer(conn, message):
                conn.send(encode_message(reply))
            return
        try:
            request = json.loads(message)
        except ValueError:
            reply = {"code": 3, "msg": "Invalid JSON: expected value at line 1 column 1"}
        else:
            reply = self.apply_subscription_request(conn, request)
        conn.send(encode_message(json.dumps(reply, separators=(",", ":")).encode()))

    def apply_subscription_request(self, conn: WsConnection, request) -> dict:
        if not isinstance(request, dict):
            return {"code": 2, "msg": "Invalid request: expected an object"}
        request_id, method, params = request.get("id"), request.get("method"), request.get("params", [])
        if not isinstance(params, list) or not all(isinstance(name, str) for name in params):
            return {"code": 2, "msg": "Invalid request: params must be a list of stream names",
                    "id": request_id}
        if method == "SUBSCRIBE":
            conn.streams.extend(name for name in params if name not in conn.streams)
            return {"result": None, "id": request_id}
        if method == "UNSUBSCRIBE":
            conn.streams = [name for name in conn.streams if name not in params]
            return {"result": None, "id": request_id}
        if method == "LIST_SUBSCRIPTIONS":
            return {"result": list(conn.streams), "id": request_id}
        return {"code": 2, "msg": f"Invalid request: unknown variant {str(method)[:40]}, expected one of "
                                  "SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS", "id": request_id}

    # -- REST ------------------------------------------------------------------------------------

    def charge_weight(self, path: str) -> dict[str, str]:
        minute = int(time.time() // 60)
        if minute != self._weight_minute:
            self._weight_minute, self._weight_used = minute, 0
        self._weight_used += REST_WEIGHTS.get(path, 1)
        self.rest_calls[path] += 1
        return {"X-MBX-USED-WEIGHT-1M": str(self._weight_used)}

    def market_data_gate(self, request: HttpRequest) -> tuple[dict[str, str], Optional[HttpResponse]]:
        """Weight headers, and the response to give instead when the request must fail up front."""
        headers = self.charge_weight(request.path)
        if self.rest429_remaining > 0:
            self.rest429_remaining -= 1
            return headers, binance_error(429, -1003, TOO_MANY_REQUESTS_MSG, {**headers, "Retry-After": "1"})
        symbol = request.query.get("symbol", "")
        if not symbol:
            return headers, binance_error(
                400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
                headers)
        if not SYMBOL_PATTERN.match(symbol):
            return headers, binance_error(
                400, -1100, "Illegal characters found in parameter 'symbol'; legal range is "
                            "'^[A-Z0-9-_.]{1,20}$'.", headers)
        if symbol != self.symbol:
            return headers, binance_error(400, -1121, "Invalid symbol.", headers)
        return headers, None

    async def rest_ping(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, {}, self.charge_weight(request.path))

    async def rest_time(self, request: HttpRequest) -> HttpResponse:
        server_time = time.time_ns() // 1_000_000
        return json_response(200, {"serverTime": server_time}, self.charge_weight(request.path))

    def paged_query(self, request: HttpRequest):
        """The checks and parameters historicalTrades and aggTrades share: (headers, limit, fromId
        or None, None) or (headers, None, None, the refusal to answer with)."""
        headers, refusal = self.market_data_gate(request)
        if refusal:
            return headers, None, None, refusal
        try:
            return headers, self.rest_limit(request.query), self.rest_from_id(request.query), None
        except ParamError as exc:
            return headers, None, None, binance_error(400, -1100, str(exc), headers)

    async def rest_historical_trades(self, request: HttpRequest) -> HttpResponse:
        headers, limit, from_id, refusal = self.paged_query(request)
        if refusal:
            return refusal
        if from_id is None:
            return self.recent_trades_response(limit, headers)
        return self.trades_response(max(from_id, self.history.first_id), limit, headers)

    async def rest_agg_trades(self, request: HttpRequest) -> HttpResponse:
        """GET /api/v3/aggTrades: by fromId (inclusive), else the most recent; one aggregate per trade."""
        headers, limit, from_id, refusal = self.paged_query(request)
        if refusal:
            return refusal
        if from_id is None:
            from_id = self.rest_last_id() + 1 - limit
        return self.agg_trades_response(max(from_id, self.history.first_id), limit, headers)

    async def rest_recent_trades(self, request: HttpRequest) -> HttpResponse:
        headers, refusal = self.market_data_gate(request)
        if refusal:
            return refusal
        try:
            limit = self.rest_limit(request.query)
        except ParamError as exc:
            return binance_error(400, -1100, str(exc), headers)
        return self.recent_trades_response(limit, headers)

    @staticmethod
    def rest_limit(query: dict[str, str]) -> int:
        raw = query.get("limit", "")
        if raw == "":
            return REST_DEFAULT_LIMIT
        if not raw.isdigit() or not 1 <= int(raw) <= REST_MAX_LIMIT:
            raise ParamError("Illegal characters found in parameter 'limit'; "
                             f"legal range is '1-{REST_MAX_LIMIT}'.")
        return int(raw)

    @staticmethod
    def rest_from_id(query: dict[str, str]) -> Optional[int]:
        raw = query.get("fromId", "")
        if raw == "":
            return None
        if not raw.isdigit() or len(raw) > 20:
            raise ParamError("Illegal characters found in parameter 'fromId'; "
                             "legal range is '^[0-9]{1,20}$'.")
        return int(raw)

    def recent_trades_response(self, limit: int, headers: dict[str, str]) -> HttpResponse:
        oldest = max(self.history.first_id, self.rest_last_id() + 1 - limit)
        return self.trades_response(oldest, limit, headers)

    def rest_last_id(self) -> int:
        """The newest trade REST shows: with a "restlag" fault, the newest one at least that old."""
        if not self.rest_lag_ms:
            return self.history.last_id
        return self.history.first_id_after_time(time.time_ns() // 1_000_000 - self.rest_lag_ms) - 1

    def trades_response(self, from_id: int, limit: int, headers: dict[str, str]) -> HttpResponse:
        qty_units = self.generator.qty_units
        qty_text = self.generator.qty_text
        trades = [
            {"id": trade_id, "price": price_text(cents), "qty": qty_text[qty],
             "quoteQty": quote_qty_text(cents, qty_units[qty]), "time": ms,
             "isBuyerMaker": bool(side), "isBestMatch": True}
            for part in self.history.slices(from_id, min(from_id + limit - 1, self.rest_last_id()))
            for trade_id, cents, qty, ms, side in
            zip(itertools.count(part.first_id), part.prices, part.qty_index, part.times, part.sides)]
        for trade in trades:
            if trade["id"] in self.bad_rest_ids:
                trade["price"] = "NaN"
        return json_response(200, trades, headers)

    def agg_trades_response(self, from_id: int, limit: int, headers: dict[str, str]) -> HttpResponse:
        qty_text = self.generator.qty_text
        rows = [{"a": trade_id, "p": "NaN" if trade_id in self.bad_rest_ids else price_text(cents),
                 "q": qty_text[qty], "f": trade_id, "l": trade_id, "T": ms, "m": bool(side), "M": True}
                for trade_id, cents, qty, ms, side in
                trade_rows(list(self.history.slices(from_id, min(from_id + limit - 1, self.rest_last_id()))))]
        return json_response(200, rows, headers)

    # -- control API ---------------------------------------------------------------------------

    def status(self) -> dict:
        mode = {} if self.protocol is None else {"mode": self.config.mode, "symbol": self.symbol}
        return {**mode, "last_id": self.history.last_id, "first_id": self.history.first_id,
                "rate": int(self.rate) if self.rate.is_integer() else self.rate,
                "paused": self.paused, "connections": len(self.connections), "generated": self.generated}

    async def control_status(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, self.status())

    async def control_pause(self, request: HttpRequest) -> HttpResponse:
        self.paused = True
        log.info("paused at id %d", self.history.last_id)
        return json_response(200, {"ok": True})

    async def control_resume(self, request: HttpRequest) -> HttpResponse:
        if self.paused:
            self.paused = False
            self.restart_schedule(time.monotonic())   # no burst for the time spent paused
            log.info("resumed after id %d", self.history.last_id)
        return json_response(200, {"ok": True})

    async def control_rate(self, request: HttpRequest) -> HttpResponse:
        self.rate = float_param(request.query, "value", 0.0, MAX_RATE)
        self.restart_schedule(time.monotonic())
        log.info("rate set to %s trades/s", self.rate)
        return json_response(200, {"ok": True})

    async def control_history(self, request: HttpRequest) -> HttpResponse:
        from_id = int_param(request.query, "fromId", self.history.first_id)
        to_id = int_param(request.query, "toId", self.history.last_id)
        # Copy the arrays here (cheap) and format in a thread, so a million rows do not stop the clock.
        slices = list(self.history.slices(from_id, to_id))
        if self.protocol is None:
            body = await asyncio.to_thread(history_rows_json, slices, self.generator.qty_text)
        else:   # prices and quantities written as this mode's trades carry them
            body = await asyncio.to_thread(history_rows_json, slices, self.protocol.history_qty_texts(),
                                           self.protocol.history_price)
        return HttpResponse(200, body)

    def traffic(self) -> dict:
        """Open connections per stream name and REST requests per path, for tests to see what a client
        used."""
        streams = collections.Counter(name for conn in self.connections if not conn.closing
                                      for name in conn.streams)
        return {"streams": dict(streams), "rest_calls": dict(self.rest_calls)}

    async def control_traffic(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, self.traffic())

    async def control_fault(self, request: HttpRequest) -> HttpResponse:
        self.inject_fault(request.query.get("kind", ""), request.query)
        return json_response(200, {"ok": True})

    # -- lifecycle ----------------------------------------------------------------------------

    async def serve(self) -> None:
        config = self.config
        server = await asyncio.start_server(self.handle_connection, config.host, config.port)
        port = server.sockets[0].getsockname()[1]
        if config.port_file:
            write_port_file(config.port_file, port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        log.info("exchange simulator (%s) listening on %s:%d symbol=%s rate=%s seed=%d start_id=%d%s",
                 config.mode, config.host, port, self.symbol, self.rate, config.seed, config.start_id,
                 " (paused)" if self.paused else "")
        self.restart_schedule(time.monotonic())
        clock = asyncio.create_task(self.run_clock())
        await self.stopping.wait()
        log.info("stopping after id %d (%d trades generated)", self.history.last_id, self.generated)
        clock.cancel()
        server.close()
        await self.close_all_clients()

    async def close_all_clients(self) -> None:
        """Say goodbye to websocket clients, close every socket, and let the handlers end by themselves."""
        for conn in list(self.connections):
            self.close_connection(conn, CLOSE_GOING_AWAY, "server shutting down")
        for writer in self._client_writers.values():
            writer.close()             # flushes what is queued (the close frames) before the FIN
        if self._client_writers:
            await asyncio.wait(list(self._client_writers), timeout=CLOSE_GRACE_SECONDS)


def write_port_file(path: str, port: int) -> None:
    """Write atomically, so a reader never sees an empty or partial file."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(f"{port}\n")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.simulator",
        description="Exchange simulator (websocket + REST on one port): Binance spot, Coinbase Exchange "
                    "or Kraken v2.")
    parser.add_argument("--mode", choices=MODES, default="binance", help="which exchange to speak (default binance)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="trades per second (up to 100000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the price/qty/side sequence")
    parser.add_argument("--symbol", default=None,
                        help="symbol traded, in the mode's form (default BTCUSDT, BTC-USD or BTC/USD)")
    parser.add_argument("--start-id", type=int, default=DEFAULT_START_ID, help="id of the first trade")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL,
                        help="seconds between server pings")
    parser.add_argument("--pong-timeout", type=float, default=DEFAULT_PONG_TIMEOUT,
                        help="close a connection whose pong is this late (seconds)")
    parser.add_argument("--max-conn-seconds", type=float, default=DEFAULT_MAX_CONN_SECONDS,
                        help="close connections older than this")
    parser.add_argument("--history-max", type=int, default=DEFAULT_HISTORY_MAX, help="trades kept for REST")
    parser.add_argument("--max-send-buffer", type=int, default=DEFAULT_MAX_SEND_BUFFER,
                        help="bytes queued for one client before it is dropped as too slow")
    parser.add_argument("--paused", action="store_true", help="start with the trade clock paused")
    return parser


def config_from_args(argv: Optional[list[str]]) -> SimConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.symbol is None:
        args.symbol = DEFAULT_SYMBOLS[args.mode]
    checks = [
        (0 < args.rate <= MAX_RATE, f"--rate must be within (0, {MAX_RATE:.0f}]"),
        (0 <= args.port <= 65535, "--port must be within [0, 65535]"),
        (MODE_SYMBOL_PATTERNS[args.mode].match(args.symbol) is not None,
         "--symbol must be upper case letters and digits" if args.mode == "binance"
         else f"--symbol must be a {args.mode} symbol like {DEFAULT_SYMBOLS[args.mode]}"),
        (args.start_id >= 0, "--start-id must not be negative"),
        (args.ping_interval > 0, "--ping-interval must be positive"),
        (args.pong_timeout > 0, "--pong-timeout must be positive"),
        (args.max_conn_seconds > 0, "--max-conn-seconds must be positive"),
        (args.history_max >= 1, "--history-max must be at least 1"),
        (args.max_send_buffer >= 1024, "--max-send-buffer must be at least 1024"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return SimConfig(host=args.host, port=args.port, port_file=args.port_file, rate=args.rate, seed=args.seed,
                     symbol=args.symbol, start_id=args.start_id, ping_interval=args.ping_interval,
                     pong_timeout=args.pong_timeout, max_conn_seconds=args.max_conn_seconds,
                     history_max=args.history_max, max_send_buffer=args.max_send_buffer, paused=args.paused,
                     mode=args.mode)


async def run_simulator(config: SimConfig) -> None:
    await ExchangeSimulator(config).serve()


def main(argv: Optional[list[str]] = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s exchange_sim %(levelname)s %(message)s")
    try:
        asyncio.run(run_simulator(config))
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", config.host, config.port, exc)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# Client side helpers for tests, the demo and benchmarks
# ---------------------------------------------------------------------------------------------

PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # tools/simulator/server.py -> the checkout


class SimulatorError(RuntimeError):
    """The simulator's control API refused a request or could not be reached."""


class SimulatorClient:
    """Control API client: `SimulatorClient("http://127.0.0.1:PORT").pause()`."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[len("http"):]

    def _call(self, method: str, path: str, **params):
        query = urllib.parse.urlencode({name: value for name, value in params.items() if value is not None})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SimulatorError(f"{method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SimulatorError(f"{method} {path}: {exc}") from exc

    def status(self) -> dict:
        return self._call("GET", "/_sim/status")

    def pause(self) -> dict:
        return self._call("POST", "/_sim/pause")

    def resume(self) -> dict:
        return self._call("POST", "/_sim/resume")

    def set_rate(self, rate: float) -> dict:
        return self._call("POST", "/_sim/rate", value=rate)

    def fault(self, kind: str, **params) -> dict:
        params = {name: int(value) if isinstance(value, bool) else value for name, value in params.items()}
        return self._call("POST", "/_sim/fault", kind=kind, **params)

    def traffic(self) -> dict:
        """{"streams": {name: open connections}, "rest_calls": {path: requests so far}}."""
        return self._call("GET", "/_sim/traffic")

    def history(self, from_id: Optional[int] = None, to_id: Optional[int] = None) -> list[list]:
        """Retained trades as `[id, price, qty, time, isBuyerMaker]`, ids from_id..to_id inclusive.
        In Binance mode the ids are also the aggregate ids of the `aggTrade` records."""
        return self._call("GET", "/_sim/history", fromId=from_id, toId=to_id)


def start_simulator(rate: float = DEFAULT_RATE, seed: int = DEFAULT_SEED, *, symbol: Optional[str] = None,
                    start_id: Optional[int] = None, ping_interval: Optional[float] = None,
                    pong_timeout: Optional[float] = None, max_conn_seconds: Optional[float] = None,
                    history_max: Optional[int] = None, max_send_buffer: Optional[int] = None,
                    paused: bool = False, log_path: Optional[str] = None,
                    startup_timeout: float = 15.0, mode: Optional[str] = None) -> tuple[subprocess.Popen, int]:
    """Start the simulator as a child process on a free loopback port; returns (process, port).

    Its output goes to log_path; without one it is kept only until startup succeeds (to explain a
    failed start), so nothing is left behind in the temporary directory.
    """
    options = {"--symbol": symbol, "--start-id": start_id, "--ping-interval": ping_interval,
               "--pong-timeout": pong_timeout, "--max-conn-seconds": max_conn_seconds,
               "--history-max": history_max, "--max-send-buffer": max_send_buffer, "--mode": mode}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="exchange-sim-") as workdir:
        port_file = os.path.join(workdir, "port")
        argv = [sys.executable, "-m", "tools.simulator", "--port", "0", "--port-file", port_file,
                "--rate", str(rate), "--seed", str(seed)]
        argv += [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
        argv += ["--paused"] if paused else []
        log_path = os.path.abspath(log_path) if log_path else os.path.join(workdir, "sim.log")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env)
        return process, wait_for_port_file(process, port_file, log_path, startup_timeout)


def wait_for_port_file(process: subprocess.Popen, port_file: str, log_path: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(port_file):
            with open(port_file) as handle:
                return int(handle.read())
        if process.poll() is not None:
            break
        time.sleep(0.02)
    stop_simulator(process)
    with open(log_path, errors="replace") as handle:
        tail = handle.read()[-2000:]
    raise SimulatorError(f"exchange simulator did not start (exit code {process.returncode}):\n{tail}")


def stop_simulator(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code (0 after a clean stop)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode

