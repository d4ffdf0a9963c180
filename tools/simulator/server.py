"""The simulator's server: one symbol's trade clock, websocket subscribers, REST routing, the
faults and the control API under `/_sim/`, all on one port. What trades look like on the wire, and
each exchange's subscribe messages and REST paging, are in binance.py, coinbase.py and kraken.py."""

from __future__ import annotations

import array
import asyncio
import collections
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

from tools.simulator import binance, coinbase, kraken
from tools.simulator.binance import BinanceProtocol, BinanceRest
from tools.simulator.coinbase import CoinbaseProtocol
from tools.simulator.exchange import ExchangeWire
from tools.simulator.http_wire import (BadRequest, Handler, HttpRequest, HttpResponse, ParamError,
                                       float_param, int_param, json_response, read_http_request)
from tools.simulator.kraken import KrakenProtocol
from tools.simulator.trades import (BOOL_TEXT, CENTER_PRICE_CENTS, TradeGenerator, TradeHistory, TradeSlice,
                                    price_text, trade_rows)
from tools.simulator.websocket_wire import (CLOSE_GOING_AWAY, CLOSE_GRACE_SECONDS, CLOSE_POLICY,
                                            CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, MAX_CLIENT_MESSAGE_BYTES,
                                            OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                                            ProtocolError, TickFeed, WsConnection, encode_frame,
                                            encode_message, read_client_frame, websocket_accept)

log = logging.getLogger("exchange_sim")

# ---------------------------------------------------------------------------------------------
# Tunables
# ---------------------------------------------------------------------------------------------

DEFAULT_RATE = 20.0
MAX_RATE = 100_000.0
DEFAULT_SEED = 1
DEFAULT_START_ID = 1_000_000
DEFAULT_PING_INTERVAL = 20.0           # Binance pings every 20 s ...
DEFAULT_PONG_TIMEOUT = 60.0            # ... and disconnects after a minute without a pong
DEFAULT_MAX_CONN_SECONDS = 86_400.0    # Binance closes every connection after 24 h
DEFAULT_HISTORY_MAX = 20_000_000
DEFAULT_MAX_SEND_BUFFER = 64 * 1024 * 1024

TICK_SECONDS = 0.005                   # generation granularity; trades of one tick share a timestamp
HOUSEKEEPING_SECONDS = 0.1             # pings, pong timeouts, connection age
MAX_BACKLOG_SECONDS = 1.0              # after a longer event-loop block, skip ahead instead of bursting
HEARTBEAT_SECONDS = 1.0                # Coinbase's heartbeat channel and Kraken v2 beat every second

FAULT_KINDS = ("drop", "cut", "stall", "fragment", "rest429", "garbage", "shutdown", "restlag", "fakeid",
               "badrow")
# What a "fakeid" fault sends: a trade, a Coinbase heartbeat, or a trade message cut after its id.
FAKE_ID_FORMS = ("trade", "heartbeat", "cut")

# The exchanges, by the --mode that selects them.
PROTOCOLS: dict[str, Callable[..., ExchangeWire]] = {
    "binance": BinanceProtocol, "coinbase": CoinbaseProtocol, "kraken": KrakenProtocol}
MODES = tuple(PROTOCOLS)
DEFAULT_SYMBOLS = {"binance": binance.DEFAULT_SYMBOL, "coinbase": coinbase.DEFAULT_SYMBOL,
                   "kraken": kraken.DEFAULT_SYMBOL}
MODE_SYMBOL_PATTERNS = {"binance": binance.SYMBOL_PATTERN, "coinbase": coinbase.SYMBOL_PATTERN,
                        "kraken": kraken.SYMBOL_PATTERN}


def history_rows_json(slices: list[TradeSlice], qty_text: tuple[str, ...],
                      price_format: Callable[[int], str] = price_text) -> bytes:
    """`[[id, price, qty, time, isBuyerMaker], ...]`; pure, so it can run in a worker thread."""
    rows = [f'[{trade_id},"{price_format(cents)}","{qty_text[qty]}",{ms},{BOOL_TEXT[side]}]'
            for trade_id, cents, qty, ms, side in trade_rows(slices)]
    return ("[" + ",".join(rows) + "]").encode()


def cut_after_id(message: bytes, record_id: int) -> bytes:
    """The wire bytes of one text message cut where a client can read the record's id and what
    names it (Binance: e, s before t; Coinbase: product_id comes after trade_id), but no more."""
    end = message.index(b",", message.index(b":%d" % record_id)) + 1
    if b'"product_id"' in message:
        end = max(end, message.index(b",", message.index(b'"product_id"')) + 1)
    frame = encode_message(message)
    return frame[:len(frame) - len(message) + end]


@dataclass(frozen=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Optional[str] = None
    rate: float = DEFAULT_RATE
    seed: int = DEFAULT_SEED
    symbol: str = binance.DEFAULT_SYMBOL
    start_id: int = DEFAULT_START_ID
    ping_interval: float = DEFAULT_PING_INTERVAL
    pong_timeout: float = DEFAULT_PONG_TIMEOUT
    max_conn_seconds: float = DEFAULT_MAX_CONN_SECONDS
    history_max: int = DEFAULT_HISTORY_MAX
    max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER
    paused: bool = False
    mode: str = "binance"


class ExchangeSimulator:
    """One symbol's trade clock, its history, websocket subscribers, REST and the control API."""

    def __init__(self, config: SimConfig):
        self.config = config
        self.symbol = config.symbol
        self.generator = TradeGenerator(config.seed)
        self.history = TradeHistory(config.start_id, config.history_max)
        self.protocol = PROTOCOLS[config.mode](self)
        self.trade_stream = self.protocol.trade_stream
        # Binance mode also serves aggregate trades; the other modes have one trade channel.
        self.agg_stream = self.protocol.agg_stream
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
        self._schedule_start = time.monotonic()
        self._scheduled_done = 0
        self._next_housekeeping = 0.0
        self.stopping = asyncio.Event()
        # Binance's REST answers in every mode (a client of another exchange never asks it), with the
        # control API's 404 and 405 shapes.
        self._routes: dict[str, tuple[str, Handler]] = {
            **BinanceRest(self).routes(),
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
        self.deliver_tick(self.trade_stream, self.protocol.tick_payloads, tick)
        if self.agg_stream is not None:
            self.deliver_tick(self.agg_stream, self.protocol.agg_tick_payloads, tick)

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

    def housekeep(self, now: float) -> None:
        config = self.config
        if self.protocol.sends_heartbeats and now >= self._next_heartbeat:
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
            # Binance's maintenance notice in every mode (the simulator has no other exchange's),
            # then the close a little later (seconds=...).
            delay = float_param(query, "seconds", 0.0, 3600.0) if "seconds" in query else 2.0
            notice = binance.shutdown_notice()
            loop = asyncio.get_running_loop()
            for conn in conns:
                combined = conn.combined and conn.streams
                body = {"stream": conn.streams[0], "data": notice} if combined else notice
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
            junk = b"".join(encode_frame(opcode, payload) for opcode, payload in self.protocol.garbage_frames)
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
            payload = self.protocol.tick_payloads(fake_id, prices, qty_index, sides, now_ms)[0]
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
        exchange_handler = self.protocol.rest_handler(request.path)
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
        subscription = self.protocol.stream_subscription(request)
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
        """A client's subscribe / unsubscribe / ... message, answered as the exchange does."""
        for reply in self.protocol.answer(conn, message):
            conn.send(encode_message(reply))

    # -- REST ------------------------------------------------------------------------------------

    def rest_last_id(self) -> int:
        """The newest trade REST shows: with a "restlag" fault, the newest one at least that old."""
        if not self.rest_lag_ms:
            return self.history.last_id
        return self.history.first_id_after_time(time.time_ns() // 1_000_000 - self.rest_lag_ms) - 1

    # -- control API ---------------------------------------------------------------------------

    def status(self) -> dict:
        # Binance's status keeps the keys it had before the simulator spoke other exchanges.
        mode = {} if self.config.mode == "binance" else {"mode": self.config.mode, "symbol": self.symbol}
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
        # Prices and quantities written as this mode's trades carry them.
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
