"""What every exchange adapter shares: REST errors, request pacing, a plain JSON GET, heartbeats and
exact time parsing. Each adapter (common/binance.py, common/coinbase.py, common/kraken.py) has the
same shape, so ingest's SourceFeed never needs to know which exchange it talks to:

  ws_url, stale_after_s           where to connect; how long silence means a dead connection
  subscribe_messages()            text messages to send once connected (empty when the URL says it all)
  parse(raw, rts)                 None (not a trade), a Trade, a list of Trades (ids ascending) or a
                                  Heartbeat(last_id); raises BadMessage for anything that must not pass,
                                  and its subclass MalformedJSON when the text does not decode as one
                                  JSON document (parse_socket_read then splits the message into its
                                  documents, keeping a cut last one for the next message)
  fetch_page(from_id, after_ts)   (trades with id >= from_id ascending, exhausted): exhausted says the
                                  exchange had nothing newer; after_ts is the time (ms) of trade
                                  from_id - 1 when known (Kraken pages by time); raises RateLimited,
                                  RestError or BadMessage
  rest_pause_s()                  how long to wait before the next REST call to stay under its limits
  pages_by_time                   True when REST pages start at a time (Kraken): ingest then keeps the
                                  time of the cursor's trade in the local Redis for backfills
  make_reassembler(max_bytes)     a common.wsframes.Reassembler for one connection (frames in, JSON
                                  documents out, max_bytes per message), sampling the fields this
                                  exchange names its records by; its connection_lost() returns the
                                  sample of the message a lost connection cut
  cut_record_id(sample)           the id (int) of the trade record that cut message held, or None:
                                  only when the sample names this adapter's trade event and symbol
                                  (Binance: e/s with t or a; Coinbase: type/product_id with trade_id;
                                  Kraken v2: always None, its ids sit in an array that is not sampled)
"""

import calendar
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import orjson

from common.trade import BadMessage

REST_TIMEOUT_S = 10.0
DEFAULT_RETRY_AFTER_S = 1.0
# ISO-8601 in UTC as Coinbase and Kraken print trade times (fractions up to nanoseconds).
ISO_UTC = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?(?:Z|\+00:00)")


class RestError(Exception):
    """The exchange's REST API did not give a usable answer."""


class RateLimited(RestError):
    def __init__(self, retry_after_s: float, status: int):
        super().__init__(f"HTTP {status}: rate limited, retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class Heartbeat(NamedTuple):
    """The exchange says its newest trade id (None when its heartbeats carry none)."""
    last_id: object


class RequestPacer:
    """A token bucket: at most `burst` calls at once, refilled at `per_second`; thread-safe."""

    def __init__(self, per_second: float, burst: float):
        self.per_second = per_second
        self.burst = burst
        self.tokens = burst
        self.updated = time.monotonic()
        self.lock = threading.Lock()

    def pause_s(self) -> float:
        """Reserve the next call: how long to wait before making it (0 when a token was at hand).
        The token is taken either way, so the caller waits once and then calls."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.per_second) - 1.0
            self.updated = now
            return 0.0 if self.tokens >= 0.0 else -self.tokens / self.per_second


def http_get_json(url: str, timeout_s: float = REST_TIMEOUT_S, rate_limited_codes=(429,), loads=orjson.loads):
    """(decoded body, headers) of a GET; RateLimited on the given statuses, RestError otherwise."""
    request = urllib.request.Request(url, headers={"User-Agent": "btcfeed", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            headers, raw = response.headers, response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in rate_limited_codes:
            raise RateLimited(retry_after_s(exc.headers), exc.code)
        raise RestError(f"HTTP {exc.code} from {url.split('?')[0]}: {_error_text(exc)}")
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError, http.client.HTTPException) as exc:
        raise RestError(f"cannot reach {url.split('?')[0]}: {getattr(exc, 'reason', exc)!s:.200}")
    try:
        return loads(raw), headers
    except (ValueError, BadMessage) as exc:
        raise BadMessage(f"REST answer is not usable JSON: {str(exc)[:80]} {raw[:80]!r}")


def retry_after_s(headers) -> float:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(DEFAULT_RETRY_AFTER_S, float(value))
    except (TypeError, ValueError):
        return DEFAULT_RETRY_AFTER_S


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = orjson.loads(exc.read())
        text = body.get("message") or body.get("msg") or body.get("error") or body
        return str(text)[:200]
    except (ValueError, AttributeError, OSError):
        return exc.reason or "error"


def iso_to_ms(name: str, value) -> int:
    """Milliseconds since the epoch from an ISO-8601 UTC time, without floats (sub-ms digits dropped)."""
    match = ISO_UTC.fullmatch(value) if value.__class__ is str else None
    if match is None:
        raise BadMessage(f"{name} is not an ISO-8601 UTC time: {value!r:.40}")
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        seconds = calendar.timegm((int(year), int(month), int(day), int(hour), int(minute), int(second)))
    except (ValueError, OverflowError):
        raise BadMessage(f"{name} is not a valid date: {value!r:.40}")
    if not (1 <= int(month) <= 12 and 1 <= int(day) <= 31 and int(hour) < 24 and int(minute) < 60
            and int(second) < 61):
        raise BadMessage(f"{name} is not a valid date: {value!r:.40}")
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    return seconds * 1000 + millis


def strictly_ascending(trades) -> bool:
    return all(a.id < b.id for a, b in zip(trades, trades[1:]))
