"""Websocket frames from a byte stream (RFC 6455, server to client), between the socket and the parser.

Reading the socket in large chunks and splitting frames in one loop is several times cheaper per
message than a library call per frame. The reader joins continuation frames into messages, keeps an
incomplete trailing frame across reads, and hands control frames (ping, pong, close) to the caller.
"""

from typing import List, Tuple

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (OP_TEXT, OP_BINARY)


class FrameError(Exception):
    """The stream broke the protocol (or a bound); the connection must be closed and replaced."""


class FrameReader:
    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self.buffer = bytearray()
        self.fragments: List[bytes] = []
        self.fragment_opcode = None
        self.fragment_bytes = 0

    @property
    def dangling(self) -> bytes:
        """What was received of a message not yet complete (for diagnosis when a connection dies)."""
        return b"".join(self.fragments) + bytes(self.buffer)

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        """Every message and control frame completed by these bytes, in order, as (opcode, payload)."""
        buf = self.buffer
        buf += data
        out = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            if second & 0x80:
                raise FrameError("masked frame from the server")
            if first & 0x70:
                raise FrameError("reserved bits set (no extension was negotiated)")
            length = second & 0x7F
            header = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                header = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                header = 10
            if length > self.max_message_bytes:
                raise FrameError(f"frame of {length} bytes is over the {self.max_message_bytes}-byte bound")
            if end - pos < header + length:
                break
            payload = bytes(buf[pos + header:pos + header + length])
            pos += header + length
            self._frame(first & 0x80, first & 0x0F, payload, out)
        del buf[:pos]
        return out

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
