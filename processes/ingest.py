"""ingest: exchange websockets -> validated, gap-free, de-duplicated trades -> the local bus.

Each source runs in its own SourceFeed thread with its own connections, cursor, gap detection and
REST backfill, so one exchange that refuses, stalls, rate-limits or sends garbage never holds up
another. Everything exchange-specific (URLs, subscription, parsing, REST paging, rate limits) is in
that exchange's adapter: common/binance.py, common/coinbase.py, common/kraken.py.
"""

import queue
import socket
import threading
import time

import redis
import websocket

from common.backoff import Backoff
from common import keys
from common.binance import BinanceAdapter
from common.bus import ALREADY_DURABLE, BUS_FULL, PUBLISHED, Bus
from common.coinbase import CoinbaseAdapter
from common.exchange import RateLimited, RestError
from common.kraken import KrakenAdapter
from common.lifecycle import EXIT_FAILURE, Process, run_process
from common.trade import BadMessage, Trade
from common.wsframes import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, FrameError, FrameReader

CONNECT_TIMEOUT_S = 10.0
# A connection that stayed up this long was healthy: the next failure starts backoff afresh.
HEALTHY_AFTER_S = 10.0
# The replacement connection must deliver before the old one is closed (or this long passes).
OVERLAP_MAX_S = 10.0
MAX_FRAME_BYTES = 1 << 20
RECV_BYTES = 1 << 18            # one socket read; its trades are handed over together
BUS_BATCH_MAX = 2000            # trades per bus entry
INBOX_MAX_BATCHES = 64          # bursts of one socket read each; then the reader blocks and TCP pushes back
FLUSH_WAIT_S = 0.002            # latency budget for batching at low rates
BUS_FULL_ALARM_EVERY_S = 10.0
# A REST answer may lag the stream by a moment: when a gap is not filled yet, ask again this often.
REST_BEHIND_RETRIES = 10
REST_BEHIND_WAIT_S = 0.2
# Local Redis field (in the source's stats hash) with the time of the cursor's trade, for exchanges
# whose REST pages go by time (Kraken): where to start a backfill after a restart.
CURSOR_TIME_FIELD = "cursor_ts"


def adapter_for(source, cfg):
    """The exchange adapter for one configured source."""
    if source.exchange == "binance":
        return BinanceAdapter(source.symbol, cfg.binance_ws_url, cfg.binance_rest_url, cfg.binance_stream_form)
    if source.exchange == "coinbase":
        return CoinbaseAdapter(source.symbol, cfg.coinbase_ws_url, cfg.coinbase_rest_url)
    if source.exchange == "kraken":
        return KrakenAdapter(source.symbol, cfg.kraken_ws_url, cfg.kraken_rest_url)
    raise ValueError(f"no adapter for exchange {source.exchange!r}")


class Connection(threading.Thread):
    """One websocket connection; hands parsed trades (or its fate) to its feed's inbox."""

    def __init__(self, feed, number: int):
        super().__init__(name=f"{feed.source}#{number}", daemon=True)
        self.feed = feed
        self.number = number
        self.ws = None
        self.opened_at = None
        self.delivered = False
        self.closing = False

    def close(self) -> None:
        """Say goodbye and unblock the reader; only the reader thread ever reads the socket."""
        self.closing = True
        ws = self.ws
        if ws is None:
            return
        try:
            ws.send_close()
        except (websocket.WebSocketException, OSError):
            pass
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass

    def run(self) -> None:
        feed = self.feed
        try:
            self.ws = websocket.create_connection(
                feed.ws_url, timeout=CONNECT_TIMEOUT_S, skip_utf8_validation=True, enable_multithread=True)
        except (websocket.WebSocketException, OSError) as exc:
            feed.inbox.put(("failed", self, _reason(exc)))
            return
        stale_after_s = feed.adapter.stale_after_s
        self.ws.settimeout(stale_after_s)
        self.opened_at = time.monotonic()
        feed.inbox.put(("connected", self, None))
        reason = "closed"
        try:
            for message in feed.adapter.subscribe_messages():
                self.ws.send(message.decode())
            self._read_until_closed()
        except (websocket.WebSocketTimeoutException, socket.timeout):
            reason = f"silent for {stale_after_s:.0f}s"
        except (websocket.WebSocketException, OSError, ValueError) as exc:
            reason = _reason(exc)
        finally:
            if self.closing:
                reason = "replaced"
            self.ws.shutdown()
            feed.inbox.put(("disconnected", self, reason))

    def _read_until_closed(self) -> None:
        """Read the socket in large chunks; every chunk's trades go to the feed as one batch."""
        feed, ws = self.feed, self.ws
        reader = FrameReader(MAX_FRAME_BYTES)
        sock = ws.sock
        while not self.closing:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("closed by the exchange")
            try:
                frames = reader.feed(data)
            except FrameError as exc:
                if not self.closing:
                    feed.reject(f"websocket: {exc}", reader.dangling[:4096])
                raise ConnectionError(str(exc))
            trades = []
            for opcode, payload in frames:
                if opcode == OP_TEXT or opcode == OP_BINARY:
                    item = feed.parse_frame(opcode, payload)
                    if item is None:
                        continue
                    kind = item.__class__
                    if kind is Trade:
                        trades.append(item)
                    elif kind is list:
                        trades.extend(item)
                    else:
                        # A heartbeat: the trades before it go first, so its id is judged after them.
                        self._hand_over(trades)
                        trades = []
                        feed.inbox.put(("heartbeat", self, item.last_id))
                elif opcode == OP_PING:
                    ws.pong(payload)
                elif opcode == OP_CLOSE:
                    self._hand_over(trades)
                    return
            self._hand_over(trades)

    def _hand_over(self, trades) -> None:
        if trades:
            self.delivered = True
            self.feed.inbox.put(("trades", self, trades))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class SourceFeed(threading.Thread):
    """One source: its connections, the sequencer (dedup, gap detection, backfill) and bus writes."""

    def __init__(self, source, cfg, bus: Bus, log, stopping: threading.Event):
        super().__init__(name=f"feed:{source.name}", daemon=True)
        self.source = source.name
        self.symbol = source.symbol
        self.adapter = adapter_for(source, cfg)
        self.ws_url = self.adapter.ws_url
        # An exchange whose REST pages go by time (Kraken) needs the time of the cursor's trade.
        self.keeps_cursor_time = self.adapter.pages_by_time
        self.max_conn_s = cfg.max_conn_hours * 3600
        self.bus = bus
        self.log = log
        self.stopping = stopping
        self.inbox = queue.Queue(maxsize=INBOX_MAX_BATCHES)
        self.backoff = Backoff()
        self.rest_backoff = Backoff(base_s=0.5, cap_s=30.0)
        self.current = None
        self.replacement = None
        self.replacement_started = 0.0
        self.next_connect_at = 0.0
        self.connections_made = 0
        self.last_id = None           # highest id accepted (published or pending)
        self.last_ts = None           # exchange time (ms) of trade last_id, when known
        self.pending = []
        self.resets = 0               # times ingest restarted from the local cursor
        self.needs_backfill = False
        self.crashed = None
        self._last_full_alarm = 0.0
        self.counts = dict(trades=0, duplicates=0, gaps=0, backfilled=0, deadlettered=0,
                           reconnects=0, batches=0, last_trade_ts=0)

    # --- thread body -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.last_id = self.bus.cursor(self.source)
            self.last_ts = self._stored_cursor_time()
            self.needs_backfill = self.last_id is not None
            self.log.info("feed_start", source=self.source, url=self.ws_url, cursor=self.last_id)
            while not self.stopping.is_set():
                self.step(time.monotonic())
        except Exception as exc:  # a feed that dies takes the process down so supervisord restarts it
            self.crashed = exc
            self.log.error("feed_crashed", source=self.source, error=repr(exc)[:300])
        finally:
            for conn in (self.current, self.replacement):
                if conn is not None:
                    conn.close()

    def step(self, now: float) -> None:
        self.manage_connections(now)
        if self.needs_backfill and self.current is not None:
            self.needs_backfill = False
            self.backfill()
        try:
            kind, conn, data = self.inbox.get(timeout=FLUSH_WAIT_S if self.pending else 0.2)
        except queue.Empty:
            self.flush()
            return
        self.handle(kind, conn, data, time.monotonic())
        if len(self.pending) >= BUS_BATCH_MAX or self.inbox.empty():
            self.flush()

    # --- connections -------------------------------------------------------------------------
    def manage_connections(self, now: float) -> None:
        if self.current is None and self.replacement is None and now >= self.next_connect_at:
            self.current = self._open()
        elif (self.current is not None and self.replacement is None and self.current.opened_at is not None
              and now - self.current.opened_at >= self.max_conn_s):
            # Before the exchange's 24 h cut: open the new connection first, close the old one after.
            self.log.info("proactive_reconnect", source=self.source, age_s=round(now - self.current.opened_at))
            self.replacement = self._open()
            self.replacement_started = now
        if self.replacement is not None and (self.replacement.delivered
                                             or now - self.replacement_started > OVERLAP_MAX_S):
            old, self.current, self.replacement = self.current, self.replacement, None
            if old is not None:
                old.close()
            self.needs_backfill = True

    def _open(self) -> Connection:
        self.connections_made += 1
        conn = Connection(self, self.connections_made)
        conn.start()
        return conn

    def handle(self, kind: str, conn: Connection, data, now: float) -> None:
        if kind == "trades":
            if self._is_next_run(data):
                self._append_run(data)
            else:
                for trade in data:
                    self.accept_live(trade)
        elif kind == "connected":
            self.log.info("connected", source=self.source, connection=conn.number)
            if conn is self.current:
                self.needs_backfill = self.last_id is not None
        elif kind == "heartbeat":
            self._heartbeat(data)
        elif kind in ("failed", "disconnected"):
            self._lost(conn, kind, data, now)

    def _heartbeat(self, exchange_last_id) -> None:
        """A heartbeat that names a newer trade than ours reveals a gap even in a quiet market."""
        if exchange_last_id is None or self.last_id is None or exchange_last_id <= self.last_id:
            return
        self.counts["gaps"] += 1
        self.log.warning("gap", source=self.source, after=self.last_id, next=exchange_last_id + 1,
                         missing=exchange_last_id - self.last_id, seen_in="heartbeat")
        self.backfill(until_id=exchange_last_id)

    def _lost(self, conn: Connection, kind: str, reason: str, now: float) -> None:
        if conn is self.replacement:
            self.replacement = None
        if conn is not self.current:
            return
        self.current = None
        if conn.opened_at is not None and now - conn.opened_at >= HEALTHY_AFTER_S:
            self.backoff.reset()
        delay = self.backoff.next_delay()
        self.next_connect_at = now + delay
        self.counts["reconnects"] += 1
        self.log.warning("connection_lost" if kind == "disconnected" else "connect_failed",
                         source=self.source, connection=conn.number, reason=reason, retry_in_s=round(delay, 2))

    def parse_frame(self, opcode: int, data: bytes):
        """Called on connection threads: a Trade, a list of Trades, a Heartbeat, or None (not a
        trade, or dead-lettered)."""
        if opcode != OP_TEXT:
            self.reject("binary frame", data)
            return None
        if len(data) > MAX_FRAME_BYTES:
            self.reject(f"frame over {MAX_FRAME_BYTES} bytes", data)
            return None
        try:
            return self.adapter.parse(data, int(time.time() * 1000))
        except BadMessage as exc:
            self.reject(str(exc), data)
            return None
        except Exception as exc:  # a parser that trips over hostile input must not end the connection
            self.reject(f"unparseable: {type(exc).__name__}: {str(exc)[:120]}", data)
            return None

    def reject(self, reason: str, raw) -> None:
        self.counts["deadlettered"] += 1
        try:
            self.bus.dead_letter(self.source, reason, raw)
        except redis.RedisError as exc:
            self.log.warning("deadletter_failed", source=self.source, error=type(exc).__name__)
        self.log.warning("message_rejected", source=self.source, reason=reason)

    # --- sequencing ----------------------------------------------------------------------------
    def accept_live(self, trade) -> None:
        self.counts["trades"] += 1
        if self.last_id is not None and trade.id <= self.last_id:
            self.counts["duplicates"] += 1
            return
        if self.last_id is not None and trade.id > self.last_id + 1:
            self.counts["gaps"] += 1
            self.log.warning("gap", source=self.source, after=self.last_id, next=trade.id,
                             missing=trade.id - self.last_id - 1)
            self.backfill(until_id=trade.id - 1)
            if trade.id <= self.last_id:
                return
        self._append(trade)

    def _is_next_run(self, trades) -> bool:
        """The common case: the burst continues the sequence exactly, with no gap or repeat inside."""
        return (self.last_id is not None and trades[0].id == self.last_id + 1
                and trades[-1].id - trades[0].id == len(trades) - 1
                and all(a.id + 1 == b.id for a, b in zip(trades, trades[1:])))

    def _append_run(self, trades) -> None:
        self.counts["trades"] += len(trades)
        resets = self.resets
        while trades:
            room = BUS_BATCH_MAX - len(self.pending)
            chunk, trades = trades[:room], trades[room:]
            self.pending.extend(chunk)
            self.last_id = chunk[-1].id
            self.last_ts = chunk[-1].ts
            self.counts["last_trade_ts"] = chunk[-1].ts
            self.counts["last_price"] = chunk[-1].p
            if len(self.pending) >= BUS_BATCH_MAX:
                self.flush()
            if self.resets != resets:
                return      # restarted from the local cursor: the backfill brings the rest

    def _append(self, trade) -> None:
        self.pending.append(trade)
        self.last_id = trade.id
        self.last_ts = trade.ts
        self.counts["last_trade_ts"] = trade.ts
        self.counts["last_price"] = trade.p
        if len(self.pending) >= BUS_BATCH_MAX:
            self.flush()

    def backfill(self, until_id: int = None) -> None:
        """Fetch trades after last_id over REST until until_id (or until caught up with the exchange)."""
        start_id, fetched, behind = self.last_id + 1, 0, 0
        while not self.stopping.is_set() and (until_id is None or self.last_id < until_id):
            from_id = self.last_id + 1
            answer = self._rest_page(from_id)
            if answer is None:
                return        # stopping
            page, exhausted = answer
            page = [t for t in page if t.id >= from_id]
            if page and page[0].id != from_id:
                self.log.error("gap_unfillable", source=self.source, first_missing=from_id,
                               exchange_has_from=page[0].id)
            for trade in page:
                if trade.id > self.last_id:
                    self._append(trade)
                    fetched += 1
            self.flush()
            if exhausted or not page:
                if until_id is None or self.last_id >= until_id:
                    break
                if behind >= REST_BEHIND_RETRIES:
                    self.log.error("gap_unfillable", source=self.source, first_missing=self.last_id + 1,
                                   exchange_rest_ends_at=self.last_id, stream_has=until_id + 1)
                    break
                behind += 1     # the stream showed newer trades than REST has yet: ask again shortly
                self.stopping.wait(REST_BEHIND_WAIT_S)
        self.counts["backfilled"] += fetched
        self.log.info("backfilled", source=self.source, from_id=start_id, to_id=self.last_id, trades=fetched)

    def _rest_page(self, from_id: int):
        while not self.stopping.is_set():
            pause = self.adapter.rest_pause_s()
            if pause:
                if pause >= 1.0:
                    self.log.warning("rest_weight_pause", source=self.source, pause_s=round(pause, 1))
                self.stopping.wait(pause)
            try:
                answer = self.adapter.fetch_page(from_id, self.last_ts if self.last_id == from_id - 1 else None)
                self.rest_backoff.reset()
                return answer
            except RateLimited as exc:
                self.log.warning("rest_rate_limited", source=self.source, retry_after_s=exc.retry_after_s)
                self.stopping.wait(exc.retry_after_s)
            except Exception as exc:  # RestError, BadMessage, or anything odd: retry later, never crash
                if isinstance(exc, BadMessage):
                    self.reject(f"REST: {exc}", b"")
                elif not isinstance(exc, RestError):
                    exc = RestError(f"{type(exc).__name__}: {exc}")
                delay = self.rest_backoff.next_delay()
                self.log.warning("rest_failed", source=self.source, error=str(exc)[:200], retry_in_s=round(delay, 2))
                self.stopping.wait(delay)
        return None

    # --- the bus -------------------------------------------------------------------------------
    def flush(self) -> None:
        while self.pending and not self.stopping.is_set():
            try:
                result = self.bus.publish(self.source, self.pending)
            except redis.RedisError as exc:
                self._local_redis_failed(exc)
                continue
            if result in (PUBLISHED, ALREADY_DURABLE):
                self.counts["batches"] += result == PUBLISHED
                if result == PUBLISHED and self.keeps_cursor_time:
                    self._store_cursor_time(self.pending[-1].ts)
                self.pending = []
            elif result == BUS_FULL:
                self._bus_full()

    def _store_cursor_time(self, ts: int) -> None:
        """Written after the bus entry, so a local Redis that rolls back its AOF never keeps a time
        newer than its cursor's trade (an older one only makes the next backfill start earlier)."""
        try:
            self.bus.client.hset(keys.source_stats(self.source), CURSOR_TIME_FIELD, ts)
        except redis.RedisError as exc:
            self.log.warning("cursor_time_not_stored", source=self.source, error=type(exc).__name__)

    def _stored_cursor_time(self):
        if not self.keeps_cursor_time:
            return None
        value = self.bus.client.hget(keys.source_stats(self.source), CURSOR_TIME_FIELD)
        return int(value) if value is not None and value.isdigit() else None

    def _bus_full(self) -> None:
        # Never drop: hold ingest (the inbox fills, then TCP pushes back) and say so loudly.
        now = time.monotonic()
        if now - self._last_full_alarm >= BUS_FULL_ALARM_EVERY_S:
            self._last_full_alarm = now
            self.log.error("bus_full_ingest_held", source=self.source, max_entries=self.bus.max_entries)
        self.stopping.wait(0.2)

    def _local_redis_failed(self, exc: Exception) -> None:
        """Hold until the local Redis is back, then restart from its cursor: backfill covers the rest."""
        self.log.error("local_redis_unavailable", source=self.source, error=_reason(exc))
        while not self.stopping.is_set():
            self.stopping.wait(0.5)
            try:
                cursor = self.bus.cursor(self.source)
            except redis.RedisError:
                continue
            self.log.info("local_redis_back", source=self.source, cursor=cursor, dropped_pending=len(self.pending))
            self.resets += 1
            self.pending = []
            self.last_id = cursor
            try:
                self.last_ts = self._stored_cursor_time()
            except redis.RedisError:
                self.last_ts = None
            self.needs_backfill = cursor is not None
            return

    def stats(self) -> dict:
        return {**self.counts, "source": self.source, "connected": self.current is not None,
                "last_id": self.last_id, "pending": len(self.pending)}


class Ingest(Process):
    name = "ingest"

    def initialize(self) -> None:
        self.bus = Bus(self.local, self.config.bus_max_entries, self.config.deadletter_max)
        self.feeds = [SourceFeed(source, self.config, self.bus, self.log, self.stopping)
                      for source in self.config.sources]
        for feed in self.feeds:
            feed.start()
        self.exit_code = 0

    def loop_once(self, now: float) -> None:
        self.stopping.wait(0.5)
        for feed in self.feeds:
            if feed.crashed is not None:
                self.exit_code = EXIT_FAILURE
                self.stopping.set()

    def shutdown(self) -> None:
        self.stopping.set()
        for feed in getattr(self, "feeds", []):
            feed.join(timeout=5)

    def stats(self) -> dict:
        return {"sources": {feed.source: feed.stats() for feed in getattr(self, "feeds", [])}}

    def run(self) -> int:
        code = super().run()
        return code or getattr(self, "exit_code", 0)


def main(argv=None) -> int:
    return run_process(Ingest, argv)


if __name__ == "__main__":
    raise SystemExit(main())
