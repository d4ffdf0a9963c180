"""HTTP/1.1 on the server side: requests in, JSON responses out, and query parameter checks."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional

MAX_HTTP_BODY_BYTES = 1 << 20
# Rows per REST page at most: Binance's limit, Coinbase's limit and Kraken's count all stop at 1000.
REST_MAX_LIMIT = 1000
HTTP_REASONS = {101: "Switching Protocols", 200: "OK", 400: "Bad Request", 404: "Not Found",
                405: "Method Not Allowed", 426: "Upgrade Required", 429: "Too Many Requests",
                431: "Request Header Fields Too Large"}


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


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


def json_response(status: int, obj, headers: Optional[dict[str, str]] = None) -> HttpResponse:
    return HttpResponse(status, json.dumps(obj, separators=(",", ":")).encode(), headers or {})


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
