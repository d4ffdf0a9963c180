"""Read btcfeed's trades wherever they are: the primary Redis while it is healthy, a feed host's read
API (DESIGN.md section 6b) when the primary fails or stalls, and the primary again once it is back.

    from btcfeed.client import Feed

    feed = Feed("redis://primary:6379/0", api_urls=["http://feed-a:8078", "http://feed-b:8078"])
    print(feed.last())                      # newest trade: Trade(id=..., p='97012.34', ...)
    for trade in feed.follow():             # every later trade exactly once, across every switch
        print(trade.id, trade.p, trade.q, trade.side)

Only redis-py and the standard library are needed (and btcfeed.keys, which is plain string
building): a consumer installs the wheel and redis-py, nothing else of btcfeed runs here.

Trades are identified by their trade id, never by a stream entry id (entry ids differ between
servers). follow() keeps a watermark W (every id <= W was delivered) and the set of delivered ids
above W (the primary's stream may hold a trade ahead of a hole that a backfill fills later), so
whatever it reads twice after a switch, it yields once.
"""

import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from btcfeed import keys

log = logging.getLogger("btcfeed.client")

DEFAULT_SOURCE = "binance:BTCUSDT"
PRIMARY = "primary"
# exchange:SYMBOL, the exchange part lower case, the symbol the exchange's own (BTCUSDT, BTC-USD, BTC/USD).
SOURCE_PATTERN = re.compile(r"[a-z0-9]+:[A-Za-z0-9][A-Za-z0-9/._-]*")
PRIMARY_SCHEMES = ("redis", "rediss", "unix")
API_SCHEMES = ("http", "https")
# Entries per XREAD / XREVRANGE / XRANGE call.
CHUNK = 1000
# How long one XREAD waits for new entries; the socket timeout is the request timeout on top of it.
BLOCK_MS = 200
# Consecutive healthy, caught-up probes of the primary before follow() goes back to it.
HEALTHY_PROBES = 2
MINUTE_MS = 60_000
CANDLES_DEFAULT_SPAN_MS = 24 * 3600 * 1000
# The most trades the read API gives in one reply.
API_LIMIT_MAX = 10_000
# A stream with no byte at all for this long (the API sends a keep-alive every 15 s) is reopened.
STREAM_SILENT_S = 40.0
# Ranges of ids given up on (see Feed hole_s) that are still delivered if they turn up later.
MAX_SKIPPED_RANGES = 64


class FeedError(Exception):
    """Base of the errors this module raises."""


class FeedUnavailable(FeedError):
    """No backend (neither the primary nor any read API) answered."""


class UnknownSource(FeedError, LookupError):
    """No backend knows the source (no trades of it anywhere)."""


@dataclass(frozen=True, slots=True)
class Trade:
    """One trade as the exchange printed it: p and q are its exact decimal strings."""
    id: int
    p: str       # price
    q: str       # quantity
    side: str    # the taker's side: "buy" or "sell"
    ts: int      # exchange trade time, ms
    rts: int     # time the feed received it, ms

    @property
    def price(self) -> Decimal:
        return Decimal(self.p)

    @property
    def qty(self) -> Decimal:
        return Decimal(self.q)

    @classmethod
    def from_fields(cls, fields: dict) -> "Trade":
        """From a stream entry or hash (bytes or str keys and values) or a JSON object."""
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(int(f["id"]), f["p"], f["q"], f["side"], int(f["ts"]), int(f.get("rts") or 0))


@dataclass(frozen=True, slots=True)
class Candle:
    """One minute of trades: t is the minute's start (ms); prices and volume v are exact decimal
    strings; n trades, the first id fid (its price is o) and the last id lid (its price is c)."""
    t: int
    o: str
    h: str
    l: str  # noqa: E741 (the contract's field name)
    c: str
    v: str
    n: int
    fid: int
    lid: int

    @classmethod
    def from_fields(cls, fields: dict) -> "Candle":
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(int(f["t"]), f["o"], f["h"], f["l"], f["c"], f["v"], int(f["n"]), int(f["fid"]),
                   int(f["lid"]))


@dataclass(frozen=True, slots=True)
class Price:
    """The feed's price view: the newest trade of the source it follows now (the preferred source
    while it is live, the next one while it is quiet), in that source's quote currency; since is
    when that source became the price source (ms)."""
    source: str
    quote: str
    p: str
    q: str
    id: int
    ts: int
    rts: int
    since: int

    @property
    def price(self) -> Decimal:
        return Decimal(self.p)

    @classmethod
    def from_fields(cls, fields: dict) -> "Price":
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(f.get("source", ""), f.get("quote", ""), f["p"], f.get("q", ""), int(f.get("id") or 0),
                   int(f.get("ts") or 0), int(f.get("rts") or 0), int(f.get("since") or 0))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry_ms(entry_id) -> int:
    return int(_text(entry_id).partition("-")[0])


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


class _Unavailable(Exception):
    """One backend did not answer (the caller tries the next one)."""


class _NoPrice(FeedError):
    """The API keeps no price view (404)."""


class _Gone(FeedError):
    """An API no longer holds the trades right after the id asked for (410); oldest_id is its oldest."""

    def __init__(self, message: str, oldest_id: int):
        super().__init__(message)
        self.oldest_id = oldest_id


class Feed:
    """A source's trades from the primary, or from feed hosts' read APIs while the primary is down,
    stalled or under maintenance.

    primary_url: the primary Redis (redis://, rediss://, unix://), read only; None to read the APIs only.
    api_urls: base URLs of feed hosts' read APIs (http://host:8078), tried in order; two redundant
        hosts cover each other.
    source: exchange:SYMBOL, e.g. binance:BTCUSDT, coinbase:BTC-USD, kraken:BTC/USD.
    api_token: bearer token for the read APIs, if they require one.
    timeout: seconds any one request to the primary or an API may take before it counts as failed.
    stall_s: follow() leaves a backend that has given no next trade for this long while another one
        holds it (the primary paused for maintenance, a feed host whose feed stopped).
    probe_s: while on an API, how often follow() checks whether the primary is healthy and caught up.
    skew_s: clock difference tolerated between the exchange and the primary, for finding where to
        read the primary's stream from (an entry written before a trade happened cannot hold it).
    hole_s: a missing trade id that no backend delivers for this long is given up on, so that the
        set of delivered ids above it stays bounded (logged as a warning; should it turn up later,
        it is still delivered once).
    unavailable_s: follow() raises FeedUnavailable when no backend has answered for this long.

    One-shot reads (last, price, trades, candles) try the backend follow() uses now first, then the
    others; when none answers they raise FeedUnavailable, when none knows the source UnknownSource.
    """

    def __init__(self, primary_url: Optional[str] = None, api_urls: Sequence[str] = (),
                 source: str = DEFAULT_SOURCE, api_token: Optional[str] = None, timeout: float = 0.5,
                 stall_s: float = 2.0, probe_s: float = 1.0, skew_s: float = 5.0, hole_s: float = 60.0,
                 unavailable_s: float = 30.0):
        if isinstance(api_urls, str):
            api_urls = [api_urls]
        if not primary_url and not api_urls:
            raise ValueError("Feed needs a primary_url or at least one api_url")
        if not isinstance(source, str) or not SOURCE_PATTERN.fullmatch(source):
            raise ValueError(f"source must be exchange:SYMBOL (e.g. {DEFAULT_SOURCE}), not {source!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.source = source
        self.timeout = float(timeout)
        self.stall_s, self.probe_s, self.skew_s = float(stall_s), float(probe_s), float(skew_s)
        self.hole_s, self.unavailable_s = float(hole_s), float(unavailable_s)
        self.api_token = api_token
        self.primary_url = primary_url
        self.primary = _primary_client(primary_url, self.timeout) if primary_url else None
        self.api_urls = [_api_base(url) for url in api_urls]
        self.backend = PRIMARY if self.primary is not None else self.api_urls[0]
        self.switches = 0

    def __repr__(self) -> str:
        return f"Feed(source={self.source!r}, backend={self.backend!r}, switches={self.switches})"

    def close(self) -> None:
        if self.primary is not None:
            self.primary.close()

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """The backend in use ("primary" or an API's base URL) and how many times follow() switched."""
        return {"backend": self.backend, "switches": self.switches}

    # --- one-shot reads -------------------------------------------------------------------------

    def last(self) -> Trade:
        """The source's newest trade (highest id)."""
        return self._read("last", self._primary_last, lambda base: self._api_last(base))

    def price(self) -> Optional[Price]:
        """The feed's price view, or None where no price view is kept."""
        return self._read("price", self._primary_price, self._api_price)

    def trades(self, after_id: int, limit: int = 1000) -> List[Trade]:
        """Trades after_id+1, after_id+2, ... in id order, at most limit, stopping before the first id
        the backend does not hold yet: a caller that pages with after_id = the last id it got never
        skips one. If after_id lies before everything kept (the retention window), the run starts at
        the oldest trade kept. A read API gives at most 10,000 per call."""
        after_id, limit = int(after_id), int(limit)
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return self._read("trades", lambda client: self._primary_trades(client, after_id, limit),
                          lambda base: self._api_trades(base, after_id, limit))

    def candles(self, start_ms: Optional[int] = None, end_ms: Optional[int] = None) -> List[Candle]:
        """The 1-minute candles of the minutes that start in [start_ms, end_ms) (ms, exchange time),
        oldest first; end_ms defaults to now (the current minute included), start_ms to 24 hours
        before end_ms (the read API's longest span)."""
        if end_ms is None:
            end_ms = (int(time.time() * 1000) // MINUTE_MS + 1) * MINUTE_MS
        if start_ms is None:
            start_ms = end_ms - CANDLES_DEFAULT_SPAN_MS
        start_ms, end_ms = int(start_ms), int(end_ms)
        if start_ms >= end_ms:
            raise ValueError("start_ms must be below end_ms")
        return self._read("candles", lambda client: self._primary_candles(client, start_ms, end_ms),
                          lambda base: self._api_candles(base, start_ms, end_ms))

    def follow(self, after_id: Optional[int] = None) -> "Follower":
        """An iterator over every trade with an id above after_id (default: the newest trade now),
        each exactly once, in the order the backend in use delivers it: the primary's stream order
        (mostly id order; a backfilled trade comes when it lands) or an API's id order. It runs until
        closed (Follower.close(), from any thread) or until no backend has answered for unavailable_s."""
        return Follower(self, after_id)

    # --- backends in turn ---------------------------------------------------------------------------

    def _order(self) -> list:
        """The backend in use first, then the primary, then the APIs."""
        backends = ([PRIMARY] if self.primary is not None else []) + list(self.api_urls)
        if self.backend in backends:
            backends.remove(self.backend)
            backends.insert(0, self.backend)
        return backends

    def _read(self, what: str, on_primary: Callable, on_api: Callable):
        failures, unknown = [], None
        for backend in self._order():
            try:
                return on_primary(self.primary) if backend == PRIMARY else on_api(backend)
            except _Unavailable as exc:
                failures.append(f"{self._name(backend)}: {exc}")
            except UnknownSource as exc:
                unknown = exc
        if unknown is not None:
            raise UnknownSource(str(unknown))
        raise FeedUnavailable(f"{what} of {self.source}: no backend answered ({'; '.join(failures)})")

    def _name(self, backend: str) -> str:
        return _redact(self.primary_url) if backend == PRIMARY else backend

    # --- the primary --------------------------------------------------------------------------------

    def _redis(self, call: Callable):
        try:
            return call()
        except redis.RedisError as exc:
            raise _Unavailable(_one_line(exc)) from exc
        except OSError as exc:
            raise _Unavailable(_one_line(exc)) from exc

    def _unknown_on_primary(self, client) -> UnknownSource:
        return UnknownSource(f"no trades of {self.source} in the primary")

    def _primary_last(self, client) -> Trade:
        fields = self._redis(lambda: client.hgetall(keys.last(self.source)))
        if not fields:
            raise self._unknown_on_primary(client)
        return Trade.from_fields(fields)

    def _primary_newest_id(self, client) -> Optional[int]:
        value = self._redis(lambda: client.hget(keys.last(self.source), "id"))
        return int(value) if value is not None else None

    def _primary_price(self, client) -> Optional[Price]:
        fields = self._redis(lambda: client.hgetall(keys.PRICE))
        return Price.from_fields(fields) if fields else None

    def _primary_candles(self, client, start_ms, end_ms) -> List[Candle]:
        def read():
            minutes = client.zrangebyscore(keys.candles_index(self.source), start_ms, f"({end_ms}")
            pipe = client.pipeline(transaction=False)
            for minute in minutes:
                pipe.hgetall(keys.candle(self.source, int(minute)))
            return [Candle.from_fields(raw) for raw in pipe.execute() if raw]
        candles = self._redis(read)
        if not candles and not self._redis(lambda: client.exists(keys.last(self.source))):
            raise self._unknown_on_primary(client)
        return sorted(candles, key=lambda candle: candle.t)

    def _position(self, client, watermark: int) -> Tuple[str, bool]:
        """Where to read the primary's stream from so that no trade above watermark is passed by:
        the entry id to read after ("0-0": the whole stream), and whether the stream holds any trade
        at or below the watermark.

        Stream order is not id order (backfills and replays append older ids later), so the scan goes
        back from the end until it is past the time of a trade at or below the watermark by skew_s:
        a trade above the watermark happened no earlier than that one, and an entry written before a
        trade happened cannot hold it."""
        key, end, reference, skew_ms = keys.trades(self.source), "+", None, int(self.skew_s * 1000)
        while True:
            entries = self._redis(lambda: client.xrevrange(key, max=end, min="-", count=CHUNK))
            for entry_id, fields in entries:
                if int(fields[b"id"]) <= watermark:
                    ts = int(fields[b"ts"])
                    reference = ts if reference is None else max(reference, ts)
                if reference is not None and _entry_ms(entry_id) < reference - skew_ms:
                    return _text(entry_id), True
            if len(entries) < CHUNK:
                return "0-0", reference is not None
            end = "(" + _text(entries[-1][0])

    def _primary_trades(self, client, after_id: int, limit: int) -> List[Trade]:
        position, holds_older = self._position(client, after_id)
        found: Dict[int, Trade] = {}
        lowest, top = None, after_id + limit
        key = keys.trades(self.source)
        while True:
            entries = self._redis(lambda: client.xrange(key, min="(" + position if position != "0-0" else "-",
                                                        max="+", count=CHUNK))
            for entry_id, fields in entries:
                trade_id = int(fields[b"id"])
                if after_id < trade_id <= top:
                    found[trade_id] = Trade.from_fields(fields)
                if trade_id > after_id and (lowest is None or trade_id < lowest):
                    lowest = trade_id
            if len(entries) < CHUNK or len(found) == limit:
                break
            position = _text(entries[-1][0])
        if not found and lowest is None and not holds_older and not self._redis(
                lambda: client.exists(keys.last(self.source))):
            raise self._unknown_on_primary(client)
        if after_id + 1 not in found and lowest is not None and not holds_older:
            return self._primary_trades(client, lowest - 1, limit)
        run, next_id = [], after_id + 1
        while next_id in found:
            run.append(found[next_id])
            next_id += 1
        return run

    # --- the read APIs ------------------------------------------------------------------------------

    def _headers(self, extra: Optional[dict] = None) -> dict:
        headers = {"Accept": "application/json", "User-Agent": "btcfeed-client"}
        if self.api_token:
            headers["Authorization"] = f"Bearer {self.api_token}"
        headers.update(extra or {})
        return headers

    def _url(self, base: str, path: str, **params) -> str:
        query = urllib.parse.urlencode({name: value for name, value in params.items() if value is not None})
        return f"{base}{path}" + (f"?{query}" if query else "")

    def _open(self, base: str, path: str, timeout: float, headers: Optional[dict] = None, **params):
        """The response to GET path; _Unavailable when the host does not answer or fails (5xx),
        UnknownSource on 404, FeedError on another refusal (bad token, bad request)."""
        request = urllib.request.Request(self._url(base, path, **params), headers=self._headers(headers))
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            body, document = _error_text(exc)
            exc.close()
            if exc.code == 404 and ("sources" in document or body.startswith("no trade")):
                raise UnknownSource(f"{base}: {body}") from None
            if exc.code == 404 and body.startswith("no price"):
                raise _NoPrice(body) from None
            if exc.code == 410 and isinstance(document.get("oldest_id"), int):
                raise _Gone(f"{base}: {body}", document["oldest_id"]) from None
            if exc.code >= 500 or exc.code in (404, 408, 429):
                raise _Unavailable(f"HTTP {exc.code} {body}") from None
            raise FeedError(f"{base}{path}: HTTP {exc.code} {body}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise _Unavailable(_one_line(getattr(exc, "reason", exc))) from None

    def _get(self, base: str, path: str, **params):
        response = self._open(base, path, self.timeout, **params)
        try:
            with response:
                return json.loads(response.read())
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise _Unavailable(f"bad reply to {path}: {_one_line(exc)}") from None

    def _api_last(self, base: str) -> Trade:
        reply = self._get(base, "/v1/last", source=self.source)
        trade = _unwrap(reply, "trade", "last")
        if not trade:
            raise UnknownSource(f"{base}: no trades of {self.source}")
        return Trade.from_fields(trade)

    def _api_price(self, base: str) -> Optional[Price]:
        try:
            price = _unwrap(self._get(base, "/v1/price"), "price")
        except _NoPrice:
            return None
        return Price.from_fields(price) if price and price.get("p") is not None else None

    def _api_trades(self, base: str, after_id: int, limit: int) -> List[Trade]:
        try:
            reply = self._get(base, "/v1/trades", source=self.source, after_id=after_id,
                              limit=min(limit, API_LIMIT_MAX))
        except _Gone as gone:
            if gone.oldest_id - 1 <= after_id:
                raise _Unavailable(str(gone)) from None
            return self._api_trades(base, gone.oldest_id - 1, limit)
        return [Trade.from_fields(row) for row in _unwrap(reply, "trades") or []]

    def _api_candles(self, base: str, start_ms: int, end_ms: int) -> List[Candle]:
        # The API takes trades with from <= ts < to: whole minutes, from the first that starts at or
        # after start_ms to the last that starts before end_ms.
        start = -(-start_ms // MINUTE_MS) * MINUTE_MS
        end = -(-end_ms // MINUTE_MS) * MINUTE_MS
        if start >= end:
            return []
        reply = self._get(base, "/v1/candles", source=self.source, **{"from": start, "to": end})
        return [Candle.from_fields(row) for row in _unwrap(reply, "candles") or []]

    def _api_holds(self, base: str, trade_id: int) -> bool:
        """Whether the host can give the trade trade_id now (its trades are gap-free)."""
        return any(t.id == trade_id for t in self._api_trades(base, trade_id - 1, 1))


def _unwrap(reply, *names):
    """A reply's payload, whether it is bare or under one of the given names."""
    if isinstance(reply, dict):
        for name in names:
            if name in reply:
                return reply[name]
    return reply


def _error_text(exc: urllib.error.HTTPError) -> Tuple[str, dict]:
    """The refusal's one-line text and its JSON document ({} when it is not one)."""
    try:
        body = exc.read(4000).decode("utf-8", "replace")
    except OSError:
        return str(exc.reason or ""), {}
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return " ".join(body.split())[:200], {}
    return " ".join(str(document.get("error") or document.get("message") or body).split())[:200], document


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, f"***@{netloc}", parts.path, parts.query, ""))
    return url


def _primary_client(url: str, timeout: float) -> redis.Redis:
    scheme = urllib.parse.urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme not in PRIMARY_SCHEMES:
        raise ValueError(f"primary_url must be a redis://, rediss:// or unix:// URL, not {url!r}")
    try:
        # One immediate retry on a dropped connection (an idle one the server closed); a timeout is
        # not retried: it counts as a failure at once.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        return redis.Redis.from_url(url, socket_timeout=timeout + BLOCK_MS / 1000,
                                    socket_connect_timeout=timeout, retry=retry)
    except ValueError as exc:
        raise ValueError(f"primary_url {_redact(url)!r}: {exc}") from None


def _api_base(url: str) -> str:
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in API_SCHEMES or not parts.hostname:
        raise ValueError(f"api_urls must be http:// or https:// URLs, not {url!r}")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"api_urls: bad port in {url!r}") from None
    return url.rstrip("/")


class _SSE:
    """Server-Sent Events over a streaming HTTP response: next_event() returns (event, data), or
    None at the end of the stream; a read timeout raises socket.timeout (TimeoutError)."""

    def __init__(self, response):
        self.response = response
        self.last_bytes = time.monotonic()
        self.buffer = b""
        self.start = 0
        self.data: List[str] = []
        self.event = ""

    def next_event(self) -> Optional[Tuple[str, str]]:
        while True:
            newline = self.buffer.find(b"\n", self.start)
            if newline < 0:
                chunk = self.response.read1(65536)
                if not chunk:
                    return None
                self.last_bytes = time.monotonic()
                self.buffer = self.buffer[self.start:] + chunk
                self.start = 0
                continue
            line = self.buffer[self.start:newline].rstrip(b"\r").decode("utf-8", "replace")
            self.start = newline + 1
            if not line:
                if self.data:
                    event = (self.event or "message", "\n".join(self.data))
                    self.data, self.event = [], ""
                    return event
                self.event = ""
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                self.data.append(value)
            elif name == "event":
                self.event = value


class Follower:
    """The iterator follow() returns. Attributes: watermark (every id up to it was delivered),
    backend (as Feed.backend), switches. close() ends the iteration from any thread within about
    a second."""

    def __init__(self, feed: Feed, after_id: Optional[int]):
        self.feed = feed
        self.watermark = int(after_id) if after_id is not None else None
        self.above = set()          # delivered ids above the watermark
        self.top = self.watermark   # the highest id delivered (or the watermark)
        self.skipped: List[Tuple[int, int]] = []
        self.advanced = time.monotonic()
        self.last_check = 0.0
        self.down_since = None
        self.tried = set()
        self._closed = threading.Event()
        self._iterator = self._run()

    def __iter__(self) -> "Follower":
        return self

    def __next__(self) -> Trade:
        return next(self._iterator)

    def close(self) -> None:
        self._closed.set()

    @property
    def backend(self) -> str:
        return self.feed.backend

    @property
    def switches(self) -> int:
        return self.feed.switches

    def stats(self) -> dict:
        return {**self.feed.stats(), "watermark": self.watermark, "pending": len(self.above),
                "skipped": list(self.skipped)}

    # --- exactly once ------------------------------------------------------------------------------

    def _take(self, trade: Trade) -> bool:
        """Whether the trade is new (and mark it delivered)."""
        trade_id = trade.id
        if trade_id <= self.watermark:
            for index, (low, high) in enumerate(self.skipped):
                if low <= trade_id <= high:
                    self._unskip(index, trade_id)
                    return True
            return False
        if trade_id in self.above:
            return False
        if trade_id == self.watermark + 1:
            self.watermark = trade_id
            while self.watermark + 1 in self.above:
                self.above.remove(self.watermark + 1)
                self.watermark += 1
            self.advanced = time.monotonic()
        else:
            self.above.add(trade_id)
        if trade_id > self.top:
            self.top = trade_id
        return True

    def _unskip(self, index: int, trade_id: int) -> None:
        low, high = self.skipped.pop(index)
        self.skipped[index:index] = [r for r in ((low, trade_id - 1), (trade_id + 1, high)) if r[0] <= r[1]]

    def _give_up_holes(self) -> None:
        if not self.above or time.monotonic() - self.advanced < self.feed.hole_s:
            return
        self._give_up(self.watermark + 1, min(self.above) - 1,
                      f"not delivered by any backend for {self.feed.hole_s:.0f} s")

    def _give_up(self, low: int, high: int, why: str) -> None:
        """Move the watermark past low..high (a trade of it that turns up later is still delivered once)."""
        if high < low:
            return
        log.warning("btcfeed client %s: going on without trades %d..%d: %s", self.feed.source, low, high, why)
        self.skipped = (self.skipped + [(low, high)])[-MAX_SKIPPED_RANGES:]
        self.watermark = high
        while self.watermark + 1 in self.above:
            self.above.remove(self.watermark + 1)
            self.watermark += 1
        self.top = max(self.top, self.watermark)
        self.advanced = time.monotonic()

    # --- switching ----------------------------------------------------------------------------------

    def _switch(self, backend: str, reason: str) -> None:
        feed = self.feed
        if backend != feed.backend:
            feed.switches += 1
            log.info("btcfeed client %s: switching from %s to %s (%s) at trade %s", feed.source,
                     feed._name(feed.backend), feed._name(backend), reason, self.watermark)
            feed.backend = backend

    def _failed(self, backend: str, reason: str) -> str:
        """After a backend failed: the next one to try (pausing once every backend failed in a row);
        FeedUnavailable when none has answered for unavailable_s."""
        feed = self.feed
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
            self.tried = set()
        self.tried.add(backend)
        # The read APIs in turn, starting after the one that failed, and the primary last (it failed,
        # or it is not caught up yet, or follow() would be on it).
        apis = list(feed.api_urls)
        if backend in apis:
            index = apis.index(backend) + 1
            apis = apis[index:] + apis[:index]
        order = apis + ([PRIMARY] if feed.primary is not None else [])
        if now - self.down_since > feed.unavailable_s:
            raise FeedUnavailable(f"follow {feed.source}: no backend answered for {feed.unavailable_s:.0f} s "
                                  f"(last: {feed._name(backend)}: {reason})")
        untried = [b for b in order if b not in self.tried]
        if not untried:
            log.warning("btcfeed client %s: no backend answers (last: %s: %s); retrying", feed.source,
                        feed._name(backend), reason)
            self._closed.wait(min(1.0, feed.timeout * 2))
            self.tried = set()
            untried = order
        return untried[0]

    def _answered(self) -> None:
        self.down_since = None

    def _stall_target(self, current: str) -> Optional[Tuple[str, str]]:
        """Another backend that holds the next trade, when the current one has given none for
        stall_s (checked at most every stall_s / 2)."""
        feed = self.feed
        now = time.monotonic()
        if now - self.advanced < feed.stall_s or now - self.last_check < feed.stall_s / 2:
            return None
        self.last_check = now
        wanted = self.watermark + 1
        reason = f"{feed._name(current)} gave nothing new for {now - self.advanced:.1f} s"
        for backend in feed._order():
            if backend == current:
                continue
            try:
                if backend == PRIMARY:
                    newest = feed._primary_newest_id(feed.primary)
                    if newest is not None and newest > self.top:
                        return backend, reason
                elif feed._api_holds(backend, wanted):
                    return backend, reason
            except (_Unavailable, FeedError):
                continue
        return None

    def _primary_ready(self) -> bool:
        """The primary answers and holds everything delivered so far."""
        try:
            newest = self.feed._primary_newest_id(self.feed.primary)
        except _Unavailable:
            return False
        return newest is not None and newest >= self.top

    # --- the loop -----------------------------------------------------------------------------------

    def _start(self) -> None:
        feed = self.feed
        newest = feed.last()             # UnknownSource / FeedUnavailable, at once
        if self.watermark is None:
            self.watermark = self.top = newest.id
        log.info("btcfeed client %s: following after trade %d from %s", feed.source, self.watermark,
                 feed._name(feed.backend))

    def _run(self) -> Iterator[Trade]:
        self._start()
        while not self._closed.is_set():
            backend = self.feed.backend
            if backend == PRIMARY:
                next_backend, reason = yield from self._on_primary()
            else:
                next_backend, reason = yield from self._on_api(backend)
            self._switch(next_backend, reason)

    def _on_primary(self):
        feed, client = self.feed, self.feed.primary
        try:
            position, _ = feed._position(client, self.watermark)
            key = keys.trades(feed.source)
            while not self._closed.is_set():
                reply = feed._redis(lambda: client.xread({key: position}, count=CHUNK, block=BLOCK_MS))
                self._answered()
                for _, entries in reply or ():
                    for entry_id, fields in entries:
                        position = entry_id
                        trade = Trade.from_fields(fields)
                        if self._take(trade):
                            yield trade
                self._give_up_holes()
                target = self._stall_target(PRIMARY)
                if target:
                    return target
        except _Unavailable as exc:
            reason = f"primary failed: {exc}"
            return self._failed(PRIMARY, reason), reason
        return PRIMARY, "closed"

    def _on_api(self, base: str):
        feed = self.feed
        read_timeout = max(feed.timeout, feed.probe_s)
        try:
            response = feed._open(base, "/v1/stream", read_timeout, {"Accept": "text/event-stream",
                                                                     "Last-Event-ID": str(self.watermark)},
                                  source=feed.source)
        except _Gone as gone:
            # The host no longer holds the trades right after the watermark (older than its retention).
            self._give_up(self.watermark + 1, gone.oldest_id - 1, f"{base} no longer holds them")
            return base, "resume at the host's oldest trade"
        except (_Unavailable, FeedError) as exc:
            reason = f"{base} failed: {exc}"
            return self._failed(base, reason), reason
        self._answered()
        stream, last_probe, healthy, events = _SSE(response), time.monotonic(), 0, 0
        try:
            while not self._closed.is_set():
                try:
                    event = stream.next_event()
                except (TimeoutError, socket.timeout):
                    # Nothing within the read timeout. A plain (not chunked) body can be read on after
                    # it; a chunked one may have lost its place, and a silent one is reopened.
                    if response.chunked or time.monotonic() - stream.last_bytes > STREAM_SILENT_S:
                        return base, "quiet stream reopened"
                    event = ()
                except (http.client.HTTPException, OSError, ValueError) as exc:
                    reason = f"{base} stream broke: {_one_line(exc)}"
                    return self._failed(base, reason), reason
                if event is None:
                    if events:
                        return base, "stream ended"
                    reason = f"{base} ended the stream without an event"
                    return self._failed(base, reason), reason
                if event and event[0] == "message":
                    events += 1
                    try:
                        trade = Trade.from_fields(json.loads(event[1]))
                    except (ValueError, KeyError, TypeError) as exc:
                        reason = f"{base} sent a bad event: {_one_line(exc)}"
                        return self._failed(base, reason), reason
                    if self._take(trade):
                        yield trade
                elif event and event[0] == "error":
                    log.warning("btcfeed client %s: %s ends the stream: %s", feed.source, base,
                                event[1][:200])
                now = time.monotonic()
                if feed.primary is not None and now - last_probe >= feed.probe_s:
                    last_probe = now
                    healthy = healthy + 1 if self._primary_ready() else 0
                    if healthy >= HEALTHY_PROBES:
                        return PRIMARY, "primary healthy and caught up"
                self._give_up_holes()
                target = self._stall_target(base)
                if target:
                    return target
        finally:
            response.close()
        return base, "closed"
