"""Websocket (RFC 6455) on the server side: frames out unmasked, client frames in masked, the trades
of one tick encoded once for every connection, and one connection's state."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import struct
import time
from dataclasses import dataclass
from typing import Optional

log = logging.getLogger("exchange_sim")

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR, CLOSE_POLICY, CLOSE_TOO_BIG = 1001, 1002, 1008, 1009
FRAGMENTS_PER_MESSAGE = 3
MAX_CLIENT_MESSAGE_BYTES = 1 << 20
CLOSE_GRACE_SECONDS = 2.0              # how long a closing connection may take to flush / answer


# ---------------------------------------------------------------------------------------------
# Framing
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
