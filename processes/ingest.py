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
from common.binance import BinanceAdapter
from common.bus import ALREADY_DURABLE, BUS_FULL, PUBLISHED, PUBLISHED_AFTER_GAP, Bus
from common.coinbase import CoinbaseAdapter
from common.exchange import RateLimited, RestError
from common.kraken import KrakenAdapter
from common.lifecycle import EXIT_FAILURE, Process, run_process
from common.trade import BadMessage, ServerShutdown, Trade, parse_socket_read
from common.wsframes import OP_CLOSE, OP_PING, OP_TEXT, FrameError

CONNECT_TIMEOUT_S = 10.0
# A connection that stayed up this long was healthy: the next failure starts backoff afresh.
HEALTHY_AFTER_S = 10.0
# The replacement connection must deliver before the old one is closed (or this long passes).
OVERLAP_MAX_S = 10.0
MAX_FRAME_BYTES = 1 << 20
OUTGOING_PER_S = 5               # Binance disconnects a connection that sends it more than 5 messages/s
RECV_BYTES = 1 << 18            # one socket read; its trades are handed over together
BUS_BATCH_MAX = 2000            # trades per bus entry
INBOX_MAX_BATCHES = 64          # bursts of one socket read each; then the reader blocks and TCP pushes back
FLUSH_WAIT_S = 0.002            # latency budget for batching at low rates
BUS_FULL_ALARM_EVERY_S = 10.0
# A REST answer may lag the stream by a moment: when a gap is not filled yet, ask again this often.
REST_BEHIND_RETRIES = 10
REST_BEHIND_WAIT_S = 0.2


def adapter_for(source, cfg):
    """The exchange adapter for one configured source."""
    if source.exchange == "binance":
        return BinanceAdapter(source.symbol, cfg.binance_ws_url, cfg.binance_rest_url, cfg.binance_stream_form,
                              cfg.binance_trade_kind)
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
        self.reassembler = feed.adapter.make_reassembler(MAX_FRAME_BYTES)
        self.cut_id = None            # id of a trade whose message the end of the connection cut
        self.sent = []                # when this connection last sent messages (pongs), for the limit

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
            self._sample_cut()
            feed.inbox.put(("disconnected", self, reason))

    def _read_until_closed(self) -> None:
        """Read the socket in large chunks; every chunk's trades go to the feed as one batch.

        The reassembler joins continuation frames, keeps a message cut across reads, and splits
        a message that holds several JSON documents; a message still incomplete when the
        connection ends is sampled (see _sample_cut)."""
        feed, ws, reassembler = self.feed, self.ws, self.reassembler
        parse, sock = feed.parse_document, ws.sock
        while not self.closing:
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionError("closed by the exchange")
            try:
                results, rejects, controls = parse_socket_read(reassembler, data, parse, int(time.time() * 1000))
            except FrameError as exc:
                if not self.closing:
                    feed.reject(f"websocket: {exc}", reassembler.frames.dangling[:4096])
                raise ConnectionError(str(exc))
            for reason, raw in rejects:
                feed.reject(reason, raw)
            trades = []
            for item in results:
                kind = item.__class__
                if kind is Trade:
                    trades.append(item)
                elif kind is list:
                    trades.extend(item)
                elif kind is ServerShutdown:
                    feed.inbox.put(("shutdown_notice", self, None))
                else:
                    # A heartbeat: the trades before it go first, so its id is judged after them.
                    self._hand_over(trades)
                    trades = []
                    feed.inbox.put(("heartbeat", self, item.last_id))
            self._hand_over(trades)
            for opcode, payload in controls:
                if opcode == OP_PING:
                    self._pong(payload)
                elif opcode == OP_CLOSE:
                    return

    def _pong(self, payload: bytes) -> None:
        """Answer a ping, but never send the exchange more than OUTGOING_PER_S messages a second
        (Binance's limit is 5 per connection); a pong beyond that would only answer a flood."""
        now = time.monotonic()
        self.sent = [t for t in self.sent if now - t < 1.0]
        if len(self.sent) >= OUTGOING_PER_S:
            self.feed.log.warning("pong_skipped", source=self.feed.source, reason="over 5 messages/s")
            return
        self.sent.append(now)
        self.ws.pong(payload)

    def _sample_cut(self) -> None:
        """A message cut by the end of the connection never becomes a trade; its sample may still
        name the trade's id, so the backfill can fetch exactly up to it."""
        sample = self.reassembler.connection_lost()
        if sample:
            self.cut_id = self.feed.adapter.cut_record_id(sample)

    def _hand_over(self, trades) -> None:
        if trades:
            self.delivered = True
            self.feed.inbox.put(("trades", self, trades))


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class Backfiller(threading.Thread):
    """Fills a source's recorded gaps over REST while its live trades keep flowing.

    The gaps live in the local Redis with the cursor (common/bus.py), so a restart in the middle
    of a long backfill goes on where it stopped. Oldest gap first; the open catch-up after a
    reconnect last. Each page is published with a script that shrinks its gap in the same step.
    """

    def __init__(self, feed):
        super().__init__(name=f"backfill:{feed.source}", daemon=True)
        self.feed, self.source, self.bus, self.log = feed, feed.source, feed.bus, feed.log
        self.adapter, self.stopping = feed.adapter, feed.stopping
        self.wake = threading.Event()
        self.rest_backoff = Backoff(base_s=0.5, cap_s=30.0)
        self.behind = {}          # gap -> times REST had nothing yet for it
        self.progress = {"gaps_open": 0, "missing": 0, "catching_up": False}

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                gaps = self.bus.gaps(self.source)
                self._note_progress(gaps)
                if not gaps:
                    self.wake.wait(1.0)
                    self.wake.clear()
                    continue
                self.fill_one_page(_oldest(gaps))
            except redis.RedisError as exc:
                self.log.warning("backfill_waits_for_local_redis", source=self.source, error=_reason(exc))
                self.stopping.wait(0.5)
            except Exception as exc:  # never let the backfill die quietly: say so and try again
                self.log.error("backfill_error", source=self.source, error=f"{type(exc).__name__}: {exc}"[:300])
                self.stopping.wait(1.0)

    def _note_progress(self, gaps) -> None:
        bounded = [g for g in gaps.values() if g.last is not None]
        self.progress = {"gaps_open": len(bounded), "missing": sum(g.last - g.first + 1 for g in bounded),
                         "catching_up": "open" in gaps}

    def fill_one_page(self, gap) -> None:
        before = gap.before if gap.field != "open" else self.bus.cursor_time(self.source)
        answer = self._rest_page(gap.first, before)
        if answer is None:
            return
        page, exhausted = answer
        page = [t for t in page if t.id >= gap.first and (gap.last is None or t.id <= gap.last)]
        if page and page[0].id != gap.first:
            self._give_up(gap, "the exchange has no trades with these ids", keep_from=page[0].id)
            return
        if page:
            self._publish(gap, page)
        if page and gap.last is not None and page[-1].id >= gap.last:
            return              # this gap is filled
        if exhausted or not page:
            self._rest_has_nothing_newer(gap)

    def _publish(self, gap, page) -> None:
        field = gap.field
        for start in range(0, len(page), BUS_BATCH_MAX):
            chunk = page[start:start + BUS_BATCH_MAX]
            while not self.stopping.is_set():
                result = self.bus.publish_backfill(self.source, field, chunk)
                if result != BUS_FULL:
                    break
                self.stopping.wait(0.2)      # the bus is full: hold, as the live path does
            if result != PUBLISHED:
                return              # the gap changed meanwhile (live trades, a restart): read again
            self.feed.counts["backfilled"] += len(chunk)
            if field != "open":
                field = str(chunk[-1].id + 1)
        self.log.info("backfilled", source=self.source, from_id=page[0].id, to_id=page[-1].id,
                      trades=len(page), gap="catch-up" if gap.field == "open" else gap.field)

    def _rest_has_nothing_newer(self, gap) -> None:
        if gap.field == "open":
            # Caught up with the exchange: whatever comes next arrives live.
            self.bus.give_up_gap(self.source, "open", self.bus.gaps(self.source).get("open", gap).record)
            return
        # The stream (or a heartbeat) showed these ids, but REST does not have them yet: ask again.
        tries = self.behind.get(gap.record, 0) + 1
        self.behind[gap.record] = tries
        if tries > REST_BEHIND_RETRIES:
            self._give_up(gap, "REST does not have these ids")
        else:
            self.stopping.wait(REST_BEHIND_WAIT_S)

    def _give_up(self, gap, why: str, keep_from: int = None) -> None:
        last = (keep_from - 1) if keep_from is not None else gap.last
        self.log.error("gap_unfillable", source=self.source, first_missing=gap.first, last_missing=last, why=why)
        self.bus.give_up_gap(self.source, gap.field, gap.record, keep_from)
        self.behind.pop(gap.record, None)

    def _rest_page(self, from_id: int, before_ts):
        while not self.stopping.is_set():
            pause = self.adapter.rest_pause_s()
            if pause:
                if pause >= 1.0:
                    self.log.warning("rest_weight_pause", source=self.source, pause_s=round(pause, 1))
                self.stopping.wait(pause)
            try:
                answer = self.adapter.fetch_page(from_id, before_ts)
                self.rest_backoff.reset()
                return answer
            except RateLimited as exc:
                self.log.warning("rest_rate_limited", source=self.source, retry_after_s=exc.retry_after_s)
                self.stopping.wait(exc.retry_after_s)
            except Exception as exc:  # RestError, BadMessage, or anything odd: retry later, never crash
                if isinstance(exc, BadMessage):
                    self.feed.reject(f"REST: {exc}", b"")
                elif not isinstance(exc, RestError):
                    exc = RestError(f"{type(exc).__name__}: {exc}")
                delay = self.rest_backoff.next_delay()
                self.log.warning("rest_failed", source=self.source, error=str(exc)[:200], retry_in_s=round(delay, 2))
                self.stopping.wait(delay)
        return None


def _oldest(gaps: dict):
    """The gap to work on: the lowest bounded one, else the open catch-up."""
    bounded = sorted((g for g in gaps.values() if g.field != "open"), key=lambda g: g.first)
    return bounded[0] if bounded else gaps["open"]


class SourceFeed(threading.Thread):
    """One source: its connections, the sequencer (dedup, gap detection, backfill) and bus writes."""

    def __init__(self, source, cfg, bus: Bus, log, stopping: threading.Event):
        super().__init__(name=f"feed:{source.name}", daemon=True)
        self.source = source.name
        self.symbol = source.symbol
        self.adapter = adapter_for(source, cfg)
        self.ws_url = self.adapter.ws_url
        self.max_conn_s = cfg.max_conn_hours * 3600
        self.bus = bus
        self.log = log
        self.stopping = stopping
        self.inbox = queue.Queue(maxsize=INBOX_MAX_BATCHES)
        self.backoff = Backoff()
        self.current = None
        self.replacement = None
        self.replacement_started = 0.0
        self.next_connect_at = 0.0
        self.connections_made = 0
        self.last_id = None           # highest id accepted (published or pending)
        self.pending = []
        self.resets = 0               # times ingest restarted from the local cursor
        self.crashed = None
        self._last_full_alarm = 0.0
        # cut_messages: connections that ended inside a message; cut_ids_recovered: of which the
        # received part named the trade's id (and the backfill fetched up to it).
        self.counts = dict(trades=0, duplicates=0, gaps=0, backfilled=0, deadlettered=0,
                           reconnects=0, batches=0, last_trade_ts=0, cut_messages=0, cut_ids_recovered=0)
        self.backfiller = Backfiller(self)

    # --- thread body -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.last_id = self.bus.cursor(self.source)
            self.log.info("feed_start", source=self.source, url=self.ws_url, cursor=self.last_id,
                          gaps=len(self.bus.gaps(self.source)))
            self.backfiller.start()
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
            self.catch_up()

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
                self.catch_up()
        elif kind == "heartbeat":
            self._heartbeat(data)
        elif kind == "shutdown_notice":
            self._replace_soon(conn, now)
        elif kind in ("failed", "disconnected"):
            self._lost(conn, kind, data, now)

    def _replace_soon(self, conn: Connection, now: float) -> None:
        """The exchange will close this connection (maintenance): open the next one now, and let
        the old one go once the new one delivers, as before the 24 h limit."""
        if conn is not self.current or self.replacement is not None:
            return
        self.log.info("server_shutdown_notice", source=self.source, connection=conn.number)
        self.replacement = self._open()
        self.replacement_started = now

    def catch_up(self) -> None:
        """Trades may have come and gone while no connection was open: the backfill asks REST for
        whatever follows the cursor, while the new connection's live trades go on to the bus."""
        self.flush()
        if self.last_id is not None:
            self._durably(self.bus.open_gap, self.source)
            self.backfiller.wake.set()

    def _heartbeat(self, exchange_last_id) -> None:
        """A heartbeat that names a newer trade than ours reveals a gap even in a quiet market."""
        if exchange_last_id is None or self.last_id is None or exchange_last_id <= self.last_id:
            return
        self._note_gap(exchange_last_id, "heartbeat")

    def _note_gap(self, newest_id: int, seen_in: str) -> None:
        """The exchange has trades up to newest_id that we never received: record them as a gap
        (the backfill fetches them) and carry on live from there."""
        self.flush()
        if self._durably(self.bus.note_gap, self.source, newest_id):
            self.counts["gaps"] += 1
            self.log.warning("gap", source=self.source, after=self.last_id, next=newest_id + 1,
                             missing=newest_id - self.last_id, seen_in=seen_in)
            self.backfiller.wake.set()
        self.last_id = max(self.last_id, newest_id)

    def _durably(self, call, *args):
        """A bus call that must happen: on a local Redis failure, hold and restart from the cursor."""
        while not self.stopping.is_set():
            try:
                return call(*args)
            except redis.RedisError as exc:
                self._local_redis_failed(exc)
        return None

    def _lost(self, conn: Connection, kind: str, reason: str, now: float) -> None:
        self.counts["cut_messages"] += conn.reassembler.partial_seen
        self.counts["cut_ids_recovered"] += conn.reassembler.recovered
        if conn.cut_id is not None and self.last_id is not None and conn.cut_id > self.last_id:
            # The connection died inside a trade message: that trade exists, fetch up to it.
            self._note_gap(conn.cut_id, "cut message")
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

    def parse_document(self, data: bytes, rts: int):
        """Called on connection threads, one JSON document at a time: a Trade, a list of Trades, a
        Heartbeat, or None (not a trade). BadMessage goes back to the reader as a dead letter."""
        try:
            return self.adapter.parse(data, rts)
        except BadMessage:
            raise
        except Exception as exc:  # a parser that trips over hostile input must not end the connection
            raise BadMessage(f"unparseable: {type(exc).__name__}: {str(exc)[:120]}")

    def parse_frame(self, opcode: int, data: bytes):
        """One whole websocket message outside the socket reader (tests, tools): as parse_document,
        with binary and oversized messages and bad ones dead-lettered here."""
        if opcode != OP_TEXT:
            self.reject("binary frame", data)
            return None
        if len(data) > MAX_FRAME_BYTES:
            self.reject(f"frame over {MAX_FRAME_BYTES} bytes", data)
            return None
        try:
            return self.parse_document(data, int(time.time() * 1000))
        except BadMessage as exc:
            self.reject(str(exc), data)
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
            # A bus batch holds contiguous ids: the publish of the next one records the skipped
            # ids as a gap, which the backfill fills while live trades keep flowing.
            self.flush()
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
            self.counts["last_trade_ts"] = chunk[-1].ts
            self.counts["last_price"] = chunk[-1].p
            if len(self.pending) >= BUS_BATCH_MAX:
                self.flush()
            if self.resets != resets:
                return      # restarted from the local cursor: the backfill brings the rest

    def _append(self, trade) -> None:
        self.pending.append(trade)
        self.last_id = trade.id
        self.counts["last_trade_ts"] = trade.ts
        self.counts["last_price"] = trade.p
        if len(self.pending) >= BUS_BATCH_MAX:
            self.flush()

    # --- the bus -------------------------------------------------------------------------------
    def flush(self) -> None:
        while self.pending and not self.stopping.is_set():
            try:
                result = self.bus.publish(self.source, self.pending)
            except redis.RedisError as exc:
                self._local_redis_failed(exc)
                continue
            if result in (PUBLISHED, PUBLISHED_AFTER_GAP, ALREADY_DURABLE):
                self.counts["batches"] += result != ALREADY_DURABLE
                if result == PUBLISHED_AFTER_GAP:
                    self.counts["gaps"] += 1
                    self.log.warning("gap", source=self.source, before=self.pending[0].id, seen_in="stream")
                    self.backfiller.wake.set()
                self.pending = []
            elif result == BUS_FULL:
                self._bus_full()

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
                self.bus.open_gap(self.source)      # what the lost trades were, REST brings back
            except redis.RedisError:
                continue
            self.backfiller.wake.set()
            return

    def stats(self) -> dict:
        return {**self.counts, **self.backfiller.progress, "source": self.source,
                "connected": self.current is not None, "last_id": self.last_id, "pending": len(self.pending)}


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
