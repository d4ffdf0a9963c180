"""api: the read API of the feed host, served from its own complete copy in the local Redis.

It keeps each source's read view (btcfeed.storage.view.ViewBuilder, one thread per source) and serves
it, so it answers whatever the primary does (DESIGN.md section 6b):

GET /v1/sources                          each source: newest and oldest trade in the view, view lag,
                                         writer state
GET /v1/last?source=                     the newest trade
GET /v1/price                            the price view (btcfeed:price), 404 while there is none
GET /v1/trades?source=&after_id=&limit=  trades above after_id in id order (limit 1..10000, default 1000)
GET /v1/candles?source=&from=&to=        1-minute candles of the trades with from <= ts < to (ms), computed
                                         from the view's trades (the local copy keeps candles only for
                                         failover periods; the view has every trade it holds)
GET /v1/stream?source=[&after_id=]       Server-Sent Events, one per trade, id: = the trade id; resumes
                                         after the Last-Event-ID header (or after_id): every later trade
                                         once, in id order, without a hole. Without either it starts live.

The rules of the health API apply: a bearer token (BTCFEED_API_TOKEN) is required to bind beyond
loopback; every request has a deadline; connections are capped. A stream has a bounded buffer of its
own (one read of the view); a client that stops reading is cut once a write waits longer than
SEND_DEADLINE_S, with a final `event: error` if it still fits, and never holds anything else back.
At most MAX_STREAMS streams are open at once (503 beyond). A trade id the view no longer holds
(below its oldest) is 410 Gone: the caller cannot get a gap-free sequence from it here.
"""

import hmac
import json
import select
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import orjson
import redis

from btcfeed import keys
from btcfeed.config import ConfigError, is_loopback
from btcfeed.events import record_event
from btcfeed.lifecycle import Process, run_process
from btcfeed.httpserver import BoundedHTTPServer, DeadlineHandler
from btcfeed.storage.apply import expected_candles
from btcfeed.storage.bus import connect_local
from btcfeed.storage.view import (SSE_EVENT, ViewBuilder, entry_rows, first_id_from_time, start_entry,
                                  trades_after, view_ends)
from btcfeed.trade import MAX_EXACT_INT, Trade

PATHS = ("/v1/sources", "/v1/last", "/v1/price", "/v1/trades", "/v1/candles", "/v1/stream")
LIMIT_DEFAULT, LIMIT_MAX = 1000, 10_000
MAX_STREAMS = 100
MAX_CONNECTIONS = MAX_STREAMS + 64
KEEPALIVE_S = 15.0
IDLE_CHECK_MS = 1000               # while the view is quiet, whether the client is still there
SEND_DEADLINE_S = 5.0              # a stream write that waits longer than this cuts the client
SEND_BUFFER_BYTES = 256 * 1024     # the kernel's share of a stream's buffer
STREAM_READ_ENTRIES = 16           # view entries per read for a stream (up to RUN_MAX trades each)
CANDLE_MAX_SPAN_MS = 24 * 3600 * 1000
CANDLE_MAX_TRADES = 2_000_000
BUILD_BLOCK_MS = 1000           # an idle view builder wakes once a second; woken at once by the writer
BUILD_ERROR_PAUSE_S = 0.5


class BadRequest(Exception):
    def __init__(self, code: int, error: str, **extra):
        super().__init__(error)
        self.code, self.error, self.extra = code, error, extra


class Api(Process):
    name = "api"
    needs_local = False            # it starts and answers (503) while the local Redis is away

    def validate(self) -> None:
        host, port = self.config.api_host, self.config.api_port
        if not is_loopback(host) and not self.config.api_token:
            raise ConfigError(f"BTCFEED_API_ADDR: {host}:{port} is reachable from other hosts; "
                              "set BTCFEED_API_TOKEN or BTCFEED_API_TOKEN_FILE (or bind to 127.0.0.1)")

    def initialize(self) -> None:
        cfg = self.config
        self.sources = [source.name for source in cfg.sources]
        # Streams block in XREAD for up to IDLE_CHECK_MS: their client's socket timeout is longer.
        self.stream_redis = connect_local(cfg.local_url, timeout_s=IDLE_CHECK_MS / 1000 + 10,
                                          name=self.client_name)
        self.builders = {}
        self.lock = threading.Lock()
        self.counts = dict(streams_open=0, streams_total=0, streams_refused=0, clients_cut=0, requests=0,
                           bad_requests=0)
        self.stream_slots = threading.BoundedSemaphore(MAX_STREAMS)
        for source in self.sources:
            threading.Thread(target=self._build_forever, args=(source,), name=f"view-{source}",
                             daemon=True).start()
        host, port = cfg.api_host, cfg.api_port
        try:
            self.server = BoundedHTTPServer((host, port), _handler_for(self, cfg.api_token), self.log,
                                            max_connections=MAX_CONNECTIONS)
        except OSError as exc:
            self.log.error("cannot_listen", addr=f"{host}:{port}", error=exc.strerror or str(exc))
            raise SystemExit(1)
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        self.log.info("listening", addr=f"{host}:{self.server.server_address[1]}",
                      auth="bearer token" if cfg.api_token else "none (loopback only)")

    def _build_forever(self, source: str) -> None:
        client = connect_local(self.config.local_url, timeout_s=BUILD_BLOCK_MS / 1000 + 10,
                               name=self.client_name)
        builder, said = None, 0.0
        while not self.stopping.is_set():
            try:
                if builder is None:
                    builder = ViewBuilder(client, source, self.log, self.name)
                    self.builders[source] = builder
                builder.step(BUILD_BLOCK_MS)
            except redis.RedisError as exc:
                # Whatever the last MULTI did, view_state says where to go on from.
                builder = None
                if time.monotonic() - said > 10:
                    said = time.monotonic()
                    self.log.warning("view_build_error", source=source,
                                     error=f"{type(exc).__name__}: {str(exc)[:200]}")
                self.stopping.wait(BUILD_ERROR_PAUSE_S)

    def loop_once(self, now: float) -> None:
        self.stopping.wait(1.0)

    def shutdown(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    def count(self, name: str, delta: int = 1) -> None:
        with self.lock:
            self.counts[name] += delta

    def stats(self) -> dict:
        builders = getattr(self, "builders", {})
        views = {}
        for source, builder in list(builders.items()):
            views[source] = builder.stats()
        return {**getattr(self, "counts", {}), "views": views}

    # --- answers ------------------------------------------------------------------------------------
    def source_param(self, query: dict) -> str:
        source = param(query, "source")
        if source is None:
            raise BadRequest(400, "the source parameter is required", sources=self.sources)
        if source not in self.sources:
            raise BadRequest(404, f"unknown source {source[:60]!r}", sources=self.sources)
        return source

    def sources_document(self) -> dict:
        local = self.local
        now_ms = int(time.time() * 1000)
        writer = {k.decode(): v.decode() for k, v in local.hgetall(keys.WRITER_STATE).items()}
        out = []
        for source in self.sources:
            ends = view_ends(local, source)
            stats = self.builders[source].stats() if source in self.builders else {}
            # The view's next from view_state: the writer moves it too, without the builder.
            stored_next = local.hget(keys.view_state(source), "next")
            item = {"source": source, "newest_id": None, "newest_ts": None, "oldest_id": None, "lag_ms": None,
                    "next_id": None if stored_next is None else int(stored_next),
                    "held_back": stats.get("held_back"),
                    "waiting_on_gap": stats.get("waiting_on_gap")}
            if ends:
                oldest, newest = ends
                item.update(newest_id=newest.id, newest_ts=newest.ts, oldest_id=oldest.id,
                            lag_ms=max(0, now_ms - newest.rts))
            out.append(item)
        return {"sources": out, "writer_state": writer.get("state", "primary"), "writer": writer}

    def last_document(self, source: str) -> dict:
        ends = view_ends(self.local, source)
        if not ends:
            raise BadRequest(404, f"no trade of {source} yet")
        return {"source": source, "trade": trade_dict(ends[1]),
                "age_ms": max(0, int(time.time() * 1000) - ends[1].ts)}

    def price_document(self) -> dict:
        price = {k.decode(): v.decode() for k, v in self.local.hgetall(keys.PRICE).items()}
        if not price:
            raise BadRequest(404, "no price yet")
        for name in ("id", "ts", "rts", "since"):
            if price.get(name, "").isdigit():
                price[name] = int(price[name])
        return price

    def check_held(self, source: str, after_id: int, ends) -> None:
        """410 when trades right after after_id are no longer in the view (it was trimmed past them)."""
        if ends and after_id + 1 < ends[0].id:
            raise BadRequest(410, f"trades after {after_id} are no longer held here; "
                                  f"the oldest is {ends[0].id}",
                             oldest_id=ends[0].id)

    def trades_document(self, query: dict) -> dict:
        source = self.source_param(query)
        limit = int_param(query, "limit", LIMIT_DEFAULT)
        if not 1 <= limit <= LIMIT_MAX:
            raise BadRequest(400, f"limit must be between 1 and {LIMIT_MAX}")
        ends = view_ends(self.local, source)
        if not ends:
            return {"source": source, "trades": [], "after_id": int_param(query, "after_id", None),
                    "newest_id": None}
        after_id = int_param(query, "after_id", ends[0].id - 1)
        self.check_held(source, after_id, ends)
        trades = trades_after(self.local, source, after_id, limit)
        return {"source": source, "after_id": after_id, "trades": [trade_dict(t) for t in trades],
                "newest_id": ends[1].id}

    def candles_document(self, query: dict) -> dict:
        source = self.source_param(query)
        start, end = int_param(query, "from", None), int_param(query, "to", None)
        if start is None or end is None:
            raise BadRequest(400, "from and to (exchange time, ms) are required")
        if not start < end or end - start > CANDLE_MAX_SPAN_MS:
            raise BadRequest(400, f"from must be below to, "
                                  f"at most {CANDLE_MAX_SPAN_MS // 3600000} hours apart")
        ends = view_ends(self.local, source)
        document = {"source": source, "from": start, "to": end, "candles": [],
                    "oldest_ts": ends[0].ts if ends else None}
        if not ends:
            return document
        first = first_id_from_time(self.local, source, start, *ends)
        if first is None:
            return document
        chosen, after_id, scanned = [], first - 1, 0
        while True:
            trades = trades_after(self.local, source, after_id, LIMIT_MAX)
            if not trades:
                break
            scanned += len(trades)
            if scanned > CANDLE_MAX_TRADES:
                raise BadRequest(400, f"the range holds more than {CANDLE_MAX_TRADES} trades; "
                                      f"ask for a shorter one")
            chosen.extend(t for t in trades if start <= t.ts < end)
            if trades[-1].ts >= end:
                break
            after_id = trades[-1].id
        candles = expected_candles(chosen)
        document["candles"] = [{name: c[name] for name in ("t", "o", "h", "l", "c", "v", "n", "fid", "lid")}
                               for _, c in sorted(candles.items())]
        return document

    # --- the stream ---------------------------------------------------------------------------------
    def stream_start(self, query: dict, last_event_id) -> tuple:
        """(source, after_id or None for live) of a stream request; BadRequest when it is wrong."""
        source = self.source_param(query)
        if last_event_id is not None and last_event_id.strip():
            after_id = parse_id("Last-Event-ID", last_event_id.strip())
        else:
            after_id = int_param(query, "after_id", None)
        ends = view_ends(self.local, source)
        if after_id is None:
            after_id = ends[1].id if ends else None
        elif ends:
            self.check_held(source, after_id, ends)
        return source, after_id

    def stream(self, handler, source: str, after_id) -> None:
        """Write the view from after_id on until the client goes, the process stops, or the client is cut."""
        sock = handler.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        sock.settimeout(SEND_DEADLINE_S)
        client, view_key = self.stream_redis, keys.view(source)
        write = handler.wfile.write
        write(b"retry: 1000\n\n")
        position = None                     # the last view entry read
        if after_id is None:
            # An empty view: the first trade it ever gets comes first.
            after_id, position = -1, "0-0"
        else:
            found = start_entry(client, source, after_id)
            position = _before(found) if found else "0-0"
        expected = None if after_id < 0 else after_id + 1
        quiet_since = time.monotonic()
        while not self.stopping.is_set():
            reply = client.xread({view_key: position}, count=STREAM_READ_ENTRIES, block=IDLE_CHECK_MS)
            if not reply:
                if _client_gone(sock):
                    return
                if time.monotonic() - quiet_since >= KEEPALIVE_S:
                    write(b": keep-alive\n\n")
                    quiet_since = time.monotonic()
                continue
            quiet_since = time.monotonic()
            parts = []
            for entry_id, fields in reply[0][1]:
                rows = entry_rows(fields)
                if expected is not None and rows[0][0] > expected:
                    return self._cut(handler, source,
                                     f"trades {expected}-{rows[0][0] - 1} are no longer held here")
                for row in rows:
                    if row[0] > after_id:
                        parts.append(SSE_EVENT % (row[0], row[0], row[1], row[2], row[3], row[4], row[5]))
                after_id = max(after_id, rows[-1][0])
                expected = after_id + 1
                position = entry_id
            if parts:
                try:
                    write("".join(parts).encode())
                except (TimeoutError, socket.timeout):
                    return self._cut(handler, source, f"the client did not read for {SEND_DEADLINE_S:.0f} s")

    def _cut(self, handler, source: str, reason: str) -> None:
        self.count("clients_cut")
        record_event(self.local, self.log, self.name, "stream_client_cut", level="warning", source=source,
                     peer=handler.client_address[0], reason=reason)
        try:
            handler.connection.setblocking(False)
            handler.connection.send(b"event: error\ndata: " + orjson.dumps({"error": reason}) + b"\n\n")
        except OSError:
            pass


def _client_gone(sock) -> bool:
    """Whether the client closed its end (a stream's client sends nothing after its request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and not sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):
        return True


def _before(entry_id) -> str:
    """An id just below the entry's, so XREAD from it returns the entry itself."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return f"{ms}-{int(seq) - 1}" if int(seq) > 0 else f"{int(ms) - 1}-18446744073709551615"


def trade_dict(trade: Trade) -> dict:
    return {"id": trade.id, "p": trade.p, "q": trade.q, "side": trade.side, "ts": trade.ts, "rts": trade.rts}


def param(query: dict, name: str):
    values = query.get(name)
    return values[-1] if values else None


def parse_id(name: str, text: str) -> int:
    if not text.isdigit() or not text.isascii() or len(text) > 16 or int(text) >= MAX_EXACT_INT:
        raise BadRequest(400, f"{name} must be a trade id (a non-negative integer), got {text[:40]!r}")
    return int(text)


def int_param(query: dict, name: str, default):
    text = param(query, name)
    if text is None or text == "":
        return default
    return parse_id(name, text)


def _handler_for(api: Api, token: str):
    expected = f"Bearer {token}".encode() if token else None
    routes = {"/v1/sources": lambda q: api.sources_document(), "/v1/price": lambda q: api.price_document(),
              "/v1/last": lambda q: api.last_document(api.source_param(q)),
              "/v1/trades": api.trades_document, "/v1/candles": api.candles_document}

    class Handler(DeadlineHandler):
        def do_GET(self):
            api.count("requests")
            try:
                self._answer()
            except BadRequest as exc:
                api.count("bad_requests")
                self._send(exc.code, {"error": exc.error, **exc.extra})
            except redis.RedisError as exc:
                api.log.warning("local_redis_error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                self._send(503, {"error": "the local Redis is not answering"})
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass
            except Exception as exc:
                api.log.error("request_failed", path=self.path[:200],
                              error=f"{type(exc).__name__}: {str(exc)[:200]}")
                self._send(500, {"error": "internal error"})

        def _answer(self):
            parts = urlsplit(self.path)
            if expected is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), expected):
                raise BadRequest(401, "a bearer token is required")
            query = parse_qs(parts.query, keep_blank_values=True)
            if parts.path == "/v1/stream":
                return self._stream(query)
            route = routes.get(parts.path)
            if route is None:
                raise BadRequest(404, "not found", paths=list(PATHS))
            self._send(200, route(query))

        def _stream(self, query):
            source, after_id = api.stream_start(query, self.headers.get("Last-Event-ID"))
            if not api.stream_slots.acquire(blocking=False):
                api.count("streams_refused")
                raise BadRequest(503, f"too many streams open (at most {MAX_STREAMS}); try again later")
            api.count("streams_open")
            api.count("streams_total")
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-store")
                self.send_header("X-Accel-Buffering", "no")
                self.end_headers()
                api.stream(self, source, after_id)
            except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
                pass                          # the client went away
            except Exception as exc:          # the headers are out: end the stream, the client resumes
                api.log.error("stream_failed", source=source, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            finally:
                api.count("streams_open", -1)
                api.stream_slots.release()
            self.close_connection = True

        def do_POST(self):
            self._send(405, {"error": "only GET is served"})

        do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_POST

        def send_error(self, code, message=None, explain=None):
            # The server's own refusals (a malformed request line, headers too long) as JSON too.
            try:
                self._send(code, {"error": (message or "bad request")[:200]})
            except OSError:
                pass

        def _send(self, code: int, document: dict) -> None:
            body = json.dumps(document).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)

    return Handler


def main(argv=None) -> int:
    return run_process(Api, argv)


if __name__ == "__main__":
    raise SystemExit(main())
