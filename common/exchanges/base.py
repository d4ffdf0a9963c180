"""What every exchange adapter shares: REST errors, request pacing, a REST client that keeps its
connections, heartbeats and exact time parsing. Each adapter (common/exchanges/binance.py,
common/exchanges/coinbase.py, common/exchanges/kraken.py) has the same shape, so ingest's SourceFeed
never needs to know which exchange it talks to:

  ws_url, stale_after_s           where to connect; how long silence means a dead connection
  subscribe_messages()            text messages to send once connected (empty when the URL says it all)
  parse(raw, rts)                 None (not a trade), a Trade, a list of Trades (ids ascending) or a
                                  Heartbeat(last_id); raises BadMessage for anything that must not pass,
                                  and its subclass MalformedJSON when the text does not decode as one
                                  JSON document (parse_socket_read then splits the message into its
                                  documents, keeping a cut last one for the next message)
  fetch_page(from_id, after_ts)   (trades with id >= from_id ascending, exhausted): exhausted says the
                                  exchange had nothing newer; after_ts is the time (ms) of trade
                                  from_id - 1 when known (Kraken pages by time); the trades are a
                                  TradePage whose `rejected` lists the rows refused one by one;
                                  raises RateLimited, RestError (also past MAX_REST_BYTES or the
                                  REST_DEADLINE_S of a request) or BadMessage (a page unusable whole)
  id_space                        which id sequence the records count in ("trade", or Binance's
                                  "aggTrade"): a cursor kept for one is meaningless for another
  rest_pause_s()                  how long to wait before the next REST call to stay under its limits
  close()                         drop the REST client's kept connections (ingest, when the source ends)
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
import re
import threading
import time
from typing import NamedTuple, Optional

import orjson
import urllib3

from btcfeed.trade import MAX_EXACT_INT, BadMessage

REST_TIMEOUT_S = 10.0
# A per-read timeout alone lets a server that drips a byte at a time hold a backfill for ever: every
# request also has a total deadline, and an answer may not grow past a size no trade page comes near
# (1,000 trades are about 150 KiB), so a broken or hostile server cannot exhaust the memory.
REST_DEADLINE_S = 30.0
MAX_REST_BYTES = 16 << 20
READ_CHUNK_BYTES = 1 << 16
DEFAULT_RETRY_AFTER_S = 1.0
# An error answer is read only for the exchange's message in it.
ERROR_BODY_BYTES = 64 << 10
# Backfill and the quarantine checks of one source may ask at once: two kept connections serve both.
POOL_CONNECTIONS = 2
# No retry inside a request: a second try would stretch its total deadline, and ingest's backoff
# already retries. A kept connection the exchange closed while idle is found before it is reused
# (the pool checks); statuses (429/418 included) come back as answers and redirects are not followed.
RETRIES = False
# "HTTPConnectionPool(host='x', port=1): " and the like, before urllib3's own words.
POOL_PREFIX = re.compile(r"^\w*Connection(?:Pool)?\([^)]*\): ")
# ISO-8601 in UTC as Coinbase and Kraken print trade times (fractions up to nanoseconds).
ISO_UTC = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"               # date
                     r"T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"  # time, fraction
                     r"(?:Z|\+00:00)")


class RestError(Exception):
    """The exchange's REST API did not give a usable answer (the message is always one line)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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


class RestClient:
    """GETs to one exchange's REST base URL over kept-alive connections: one urllib3 pool for the
    base URL, so a backfill of many pages pays one TCP/TLS handshake, not one per page. Every
    request keeps the bounds of MAX_REST_BYTES and REST_DEADLINE_S; failures are one-line RestErrors.
    Thread-safe (the backfill and the quarantine checks may share it); close() drops the connections."""

    def __init__(self, base_url: str, timeout_s: float = REST_TIMEOUT_S, rate_limited_codes=(429,),
                 default_retry_after_s: float = DEFAULT_RETRY_AFTER_S):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.rate_limited_codes = tuple(rate_limited_codes)
        self.default_retry_after_s = default_retry_after_s
        self.headers = {"User-Agent": "btcfeed", "Accept": "application/json"}
        self._pools = urllib3.PoolManager(num_pools=1, maxsize=POOL_CONNECTIONS, retries=RETRIES)

    def get(self, path: str, deadline_s: float = REST_DEADLINE_S, max_bytes: int = MAX_REST_BYTES,
            on_headers=None):
        """(body bytes, headers) of a 2xx answer to GET base_url + path; RateLimited on the
        rate-limit statuses, RestError otherwise. on_headers(headers) sees every answer's headers,
        errors included (Binance reports its used weight on both)."""
        where = path.split("?")[0]
        deadline = time.monotonic() + deadline_s
        response = self._send(path, where, deadline_s)
        try:
            if on_headers is not None:
                on_headers(response.headers)
            if response.status in self.rate_limited_codes:
                wait_s = retry_after_s(response.headers, self.default_retry_after_s)
                raise RateLimited(wait_s, response.status)
            if not 200 <= response.status < 300:
                raise RestError(f"HTTP {response.status} from {where}: {_error_text(response, deadline)}")
            return read_body(response, where, deadline, max_bytes), response.headers
        finally:
            _finish(response)

    def get_json(self, path: str, loads=orjson.loads, **bounds):
        """(decoded body, headers) of get(); BadMessage when the answer does not decode."""
        raw, headers = self.get(path, **bounds)
        try:
            return loads(raw), headers
        except (ValueError, BadMessage) as exc:
            raise BadMessage(f"REST answer is not usable JSON: {str(exc)[:80]} {raw[:80]!r}")

    def close(self) -> None:
        self._pools.clear()

    def _send(self, path: str, where: str, deadline_s: float):
        # The body is read by read_body (preload off), under the request's total deadline.
        per_read_s = min(self.timeout_s, deadline_s)
        timeout = urllib3.Timeout(connect=per_read_s, read=per_read_s, total=deadline_s)
        try:
            return self._pools.urlopen("GET", self.base_url + path, headers=self.headers, timeout=timeout,
                                       redirect=False, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RestError(f"cannot reach {self.base_url}{where}: {_reason(exc)}")


def read_body(response, where: str, deadline: float, max_bytes: int = MAX_REST_BYTES) -> bytes:
    """The whole answer, refused (RestError) past max_bytes or past the monotonic deadline. Each read
    waits at most until the deadline, so a server dripping bytes cannot stretch the request."""
    declared = response.headers.get("Content-Length") if response.headers is not None else None
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise RestError(f"REST answer from {where} is {int(declared)} bytes, over the {max_bytes} byte limit")
    chunks, size = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RestError(f"REST answer from {where} not complete within the request deadline")
        _bound_next_read(response, remaining)
        try:
            chunk = response.read1(READ_CHUNK_BYTES)
        except urllib3.exceptions.ReadTimeoutError:
            raise RestError(f"REST answer from {where} not complete within the request deadline")
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise RestError(f"REST answer from {where} broken off: {_reason(exc)}")
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise RestError(f"REST answer from {where} is over the {max_bytes} byte limit")
        chunks.append(chunk)


def _bound_next_read(response, remaining_s: float) -> None:
    """Let the next socket read wait no longer than the time left (and never longer than before).
    The pool sets the socket's timeout afresh for the next request on the same connection."""
    sock = getattr(response.connection, "sock", None)
    if sock is None:
        return
    current = sock.gettimeout()
    sock.settimeout(remaining_s if current is None else min(current, remaining_s))


def _finish(response) -> None:
    """Give the connection back for the next request when its answer was read to the end; otherwise
    (an error, a refused answer) close it, since what is left unread would spoil the next answer."""
    if response.connection is not None:
        response.close()
    response.release_conn()


def retry_after_s(headers, default_s: float = DEFAULT_RETRY_AFTER_S) -> float:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(DEFAULT_RETRY_AFTER_S, float(value))
    except (TypeError, ValueError):
        return default_s


def _error_text(response, deadline: float) -> str:
    """The exchange's own words for an error status (its JSON message), else the HTTP reason."""
    try:
        body = orjson.loads(read_body(response, "", deadline, ERROR_BODY_BYTES))
        text = body.get("message") or body.get("msg") or body.get("error") or body
        return _one_line(str(text))[:200]
    except (ValueError, AttributeError, RestError):
        return response.reason or "error"


def _reason(exc: Exception) -> str:
    """What went wrong, in one line, without the connection's repr urllib3 puts first (the caller
    names the URL)."""
    return _one_line(POOL_PREFIX.sub("", str(exc)))[:200]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def iso_to_ms(name: str, value) -> int:
    """Milliseconds since the epoch from an ISO-8601 UTC time, without floats (sub-ms digits dropped)."""
    match = ISO_UTC.fullmatch(value) if value.__class__ is str else None
    if match is None:
        raise BadMessage(f"{name} is not an ISO-8601 UTC time: {value!r:.40}")
    year, month, day, hour, minute, second = map(int, match.groups()[:6])
    fraction = match.group(7)
    # timegm would quietly roll an impossible date over (February 31 into March): check it first.
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24
            and minute < 60 and second < 61):
        raise BadMessage(f"{name} is not a valid date: {value!r:.40}")
    seconds = calendar.timegm((year, month, day, hour, minute, second))
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    return seconds * 1000 + millis


def strictly_ascending(trades) -> bool:
    return all(a.id < b.id for a, b in zip(trades, trades[1:]))


class RejectedRow(NamedTuple):
    """A REST row that must not become a trade: the reason, its text for the dead letters, and its id
    when that part of it is readable (None otherwise)."""
    reason: str
    raw: bytes
    id: Optional[int]


class TradePage(list):
    """The valid trades of a REST page (a list, ids ascending); `rejected` holds the rows refused one by
    one, so one bad row never makes the whole page unusable."""

    def __init__(self, trades=(), rejected=()):
        super().__init__(trades)
        self.rejected = list(rejected)


def parse_rows(rows, parse_row, read_id, rejected: Optional[list]) -> list:
    """Trades from REST rows (given oldest first). A row parse_row refuses raises BadMessage when
    rejected is None (the page is refused whole); otherwise it is appended to rejected with the id
    read_id(row) finds in it, and the other rows are kept."""
    trades = []
    for row in rows:
        try:
            trades.append(parse_row(row))
        except BadMessage as exc:
            if rejected is None:
                raise
            rejected.append(RejectedRow(str(exc), _row_text(row), _readable_id(read_id, row)))
    return trades


def _row_text(row) -> bytes:
    try:
        return orjson.dumps(row, default=str)[:4096]
    except TypeError:        # e.g. an integer beyond 64 bits
        return repr(row)[:4096].encode("utf-8", "replace")


def _readable_id(read_id, row) -> Optional[int]:
    try:
        value = read_id(row)
    except (BadMessage, LookupError, TypeError, ValueError, AttributeError):
        return None
    return value if type(value) is int and 0 <= value < MAX_EXACT_INT else None
