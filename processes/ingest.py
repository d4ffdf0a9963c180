"""ingest: exchange websockets -> validated, gap-free, de-duplicated trades -> the local bus.

Each source runs in its own SourceFeed thread with its own connections, cursor, gap detection and
REST backfill, so one exchange that refuses, stalls, rate-limits or sends garbage never holds up
another. Everything exchange-specific (URLs, subscription, parsing, REST paging, rate limits) is in
that exchange's adapter: common/exchanges/binance.py, common/exchanges/coinbase.py,
common/exchanges/kraken.py.
"""

import queue
import socket
import threading
import time
from typing import NamedTuple, Optional

import orjson
import redis
import websocket

from btcfeed.backoff import Backoff, Throttle
from btcfeed.exchanges.binance import BinanceAdapter
from btcfeed.storage.bus import ALREADY_DURABLE, BUS_BATCH_MAX, BUS_FULL, PUBLISHED, PUBLISHED_AFTER_GAP, Bus
from btcfeed.exchanges.coinbase import CoinbaseAdapter
from btcfeed.events import record_event
from btcfeed.exchanges.base import RateLimited, RestError
from btcfeed.exchanges.kraken import KrakenAdapter
from btcfeed.lifecycle import EXIT_FAILURE, Process, run_process
from btcfeed.trade import BadMessage, ServerShutdown, Trade, parse_socket_read
from btcfeed.wsframes import OP_CLOSE, OP_PING, OP_TEXT, FrameError

CONNECT_TIMEOUT_S = 10.0
# A connection that stayed up this long was healthy: the next failure starts backoff afresh.
HEALTHY_AFTER_S = 10.0
# The replacement connection must deliver before the old one is closed (or this long passes).
OVERLAP_MAX_S = 10.0
MAX_FRAME_BYTES = 1 << 20
OUTGOING_PER_S = 5               # Binance disconnects a connection that sends it more than 5 messages/s
RECV_BYTES = 1 << 18            # one socket read; its trades are handed over together
INBOX_MAX_BATCHES = 64          # bursts of one socket read each; then the reader blocks and TCP pushes back
BUS_FULL_ALARM_EVERY_S = 10.0
HELD_ALARM_EVERY_S = 10.0       # the local Redis refusing ingest's writes (down, or at its memory limit)
IDLE_WAIT_S = 1.0               # the feed thread with nothing pending and no timed duty
# REST may lag the stream by seconds or minutes: a gap REST has nothing for yet is asked about
# again with a growing pause (up to the cap) and kept until REST has its ids or it is older than
# the retention window (then no consumer could read the trades anyway). Once it has waited a while,
# an alarm event says so, again every GAP_ALARM_EVERY_S.
GAP_RETRY_BASE_S = 0.2
GAP_RETRY_CAP_S = 5.0
GAP_ALARM_AFTER_S = 5.0
GAP_ALARM_EVERY_S = 30.0
# A forward jump in trade ids is believed at once only if the exchange could have printed that many
# trades since our last one. The busiest BTC spot markets print a few thousand trades in their
# busiest seconds: 50,000 a second is an order of magnitude above that, and the constant covers
# bursts delivered at once and coarse clocks. A jump beyond it (one corrupt or forged id) would
# otherwise become the cursor and turn every real trade after it into a "duplicate": it is held in
# quarantine instead, and moves the cursor only once REST confirms the id exists.
MAX_PLAUSIBLE_TRADES_PER_S = 50_000
PLAUSIBLE_JUMP_IDS = 100_000
# A quarantined id is refuted (dropped, never a trade, never the cursor) when the exchange itself
# shows it did not exist: a later trade or heartbeat with a lower id, printed (by the exchange's
# clock, or received) more than this margin after the id was seen; the margin absorbs clock skew
# and delivery delay. Or when REST skips it, or when REST has not confirmed it after the longest wait.
QUARANTINE_EVIDENCE_MARGIN_MS = 5_000
QUARANTINE_MAX_WAIT_S = 600.0
QUARANTINE_MAX_HELD = 10_000       # held ids; later ones are left to the backfill once one is confirmed
QUARANTINE_RETRY_BASE_S = 0.2
QUARANTINE_RETRY_CAP_S = 5.0


def adapter_for(source, cfg):
    """The exchange adapter for one configured source."""
    if source.exchange == "binance":
        return BinanceAdapter(source.symbol, cfg.binance_ws_url, cfg.binance_rest_url,
                              cfg.binance_stream_form, cfg.binance_trade_kind)
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
                results, rejects, controls = parse_socket_read(reassembler, data, parse,
                                                               int(time.time() * 1000))
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


class Held(NamedTuple):
    """A quarantined id: the trade that named it (None for a heartbeat or a cut message), where it was
    seen, when (local wall ms), and the exchange time of our last trade then (where REST paging by
    time starts looking for it)."""
    id: int
    trade: Optional[Trade]
    seen_in: str
    seen_ms: int
    after_ts: Optional[int]


class Quarantine:
    """Ids too far ahead of the cursor to believe at once (see MAX_PLAUSIBLE_TRADES_PER_S). The feed
    thread holds, releases and refutes them; the backfill thread asks REST about the lowest one."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = {}                 # id -> Held

    def __len__(self) -> int:
        return len(self.held)

    def hold(self, item: Held) -> bool:
        """False when the id is held already or the quarantine is full."""
        with self.lock:
            if item.id in self.held or len(self.held) >= QUARANTINE_MAX_HELD:
                return False
            self.held[item.id] = item
            return True

    def heads(self) -> list:
        """The lowest held id of each cluster (ids within PLAUSIBLE_JUMP_IDS of the one before), ids
        ascending: REST is asked about these, so a forged id REST never has cannot hold up a real
        jump the stream goes on from (whose trades are all one cluster)."""
        with self.lock:
            ids = sorted(self.held)
            return [self.held[i] for n, i in enumerate(ids) if n == 0 or i - ids[n - 1] > PLAUSIBLE_JUMP_IDS]

    def pop(self, item_id: int) -> Optional[Held]:
        with self.lock:
            return self.held.pop(item_id, None)

    def take(self, keep) -> list:
        """Remove and return (ids ascending) the held items for which keep(item) is false."""
        with self.lock:
            gone = sorted((item for item in self.held.values() if not keep(item)), key=lambda item: item.id)
            for item in gone:
                del self.held[item.id]
            return gone


class GapWait(NamedTuple):
    """A gap REST had nothing for yet: the record as read, tries so far, when to ask again
    (monotonic), since when it waits (monotonic) and when it last raised the alarm."""
    record: str
    tries: int
    next_at: float
    since: float
    alarmed_at: float


class Backfiller(threading.Thread):
    """Fills a source's recorded gaps over REST while its live trades keep flowing, and asks REST
    about the ids in quarantine.

    The gaps live in the local Redis with the cursor (common/storage/bus.py), so a restart in the middle
    of a long backfill goes on where it stopped. Oldest gap first; the open catch-up after a
    reconnect last; a gap REST has nothing for yet waits (with backoff) without holding up the
    others. Each page is published with a script that shrinks its gap in the same step.
    """

    def __init__(self, feed):
        super().__init__(name=f"backfill:{feed.source}", daemon=True)
        self.feed, self.source, self.bus, self.log = feed, feed.source, feed.bus, feed.log
        self.adapter, self.stopping = feed.adapter, feed.stopping
        self.retention_ms = feed.retention_ms
        self.wake = threading.Event()
        self.rest_backoff = Backoff(base_s=0.5, cap_s=30.0)
        self.waiting = {}         # gap field -> GapWait
        self.asked = {}           # quarantined id -> (tries, when to ask again)
        self.rows_deadlettered = set()
        self.progress = {"gaps_open": 0, "missing": 0, "catching_up": False, "gaps_waiting": 0}
        self.say_waiting = Throttle(HELD_ALARM_EVERY_S)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.ask_about_quarantine():
                    continue
                gaps = self.bus.gaps(self.source)
                self._note_progress(gaps)
                gap = self._next_gap(gaps, time.monotonic())
                if gap is None:
                    self._idle()
                    continue
                self.fill_one_page(gap)
            except redis.RedisError as exc:
                # A local Redis at its limit through a long outage refuses every try while it lasts.
                if self.say_waiting.due():
                    self.log.warning("backfill_waits_for_local_redis", source=self.source, error=_reason(exc))
                self.stopping.wait(0.5)
            except Exception as exc:  # never let the backfill die quietly: say so and try again
                self.log.error("backfill_error", source=self.source,
                               error=f"{type(exc).__name__}: {exc}"[:300])
                self.stopping.wait(1.0)

    def _idle(self) -> None:
        """Sleep until a waiting gap or quarantined id is due (at most a second), or until woken."""
        now = time.monotonic()
        due = [wait.next_at for wait in self.waiting.values()] + [at for _, at in self.asked.values()]
        self.wake.wait(min([1.0] + [at - now for at in due if at > now]))
        self.wake.clear()

    def _note_progress(self, gaps) -> None:
        bounded = [g for g in gaps.values() if g.last is not None]
        self.waiting = {field: wait for field, wait in self.waiting.items()
                        if field in gaps and gaps[field].record == wait.record}
        self.progress = {"gaps_open": len(bounded), "missing": sum(g.last - g.first + 1 for g in bounded),
                         "catching_up": "open" in gaps, "gaps_waiting": len(self.waiting)}

    def _next_gap(self, gaps: dict, now: float):
        """The lowest bounded gap that is not waiting for REST, else the open catch-up."""
        ready = [g for g in gaps.values()
                 if g.field not in self.waiting or self.waiting[g.field].next_at <= now]
        bounded = sorted((g for g in ready if g.field != "open"), key=lambda g: g.first)
        if bounded:
            return bounded[0]
        return next((g for g in ready if g.field == "open"), None)

    # --- filling gaps --------------------------------------------------------------------------
    def fill_one_page(self, gap) -> None:
        before = gap.before if gap.field != "open" else self.bus.cursor_time(self.source)
        answer = self._rest_page(gap.first, before)
        if answer is None:
            return
        page, _exhausted = answer
        rejected = getattr(page, "rejected", ())
        self._dead_letter_rows(rejected)
        page = [t for t in page if t.id >= gap.first]
        run = _run_from(page, gap.first, gap.last)
        if run:
            self._publish(gap, run)
        elif page:
            # REST's first valid trade is past the gap's start: the ids before it have no valid row.
            self._skip_to(gap, page[0].id, rejected)
        elif any(row.id == gap.first for row in rejected):
            self._skip_to(gap, gap.first + 1, rejected)
        else:
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

    def _skip_to(self, gap, keep_from: int, rejected) -> None:
        """Give up the gap's ids before keep_from: REST has no valid row for them (a valid trade is
        never skipped, and a bad row never becomes a trade)."""
        bad = [row for row in rejected if row.id is None or gap.first <= row.id < keep_from]
        why = ("REST rows for these ids are invalid (dead-lettered)" if bad
               else "the exchange has no trades with these ids")
        self._give_up(gap, why, keep_from=keep_from)

    def _dead_letter_rows(self, rejected) -> None:
        """Each refused REST row goes to the dead letters once (REST may show it again and again)."""
        for row in rejected:
            key = (row.id, row.reason, row.raw)
            if key in self.rows_deadlettered:
                continue
            if len(self.rows_deadlettered) >= 10_000:
                self.rows_deadlettered.clear()
            self.rows_deadlettered.add(key)
            self.feed.reject(f"REST row: {row.reason}", row.raw)

    def _rest_has_nothing_newer(self, gap) -> None:
        if gap.field == "open":
            # Caught up with the exchange: whatever comes next arrives live.
            self.bus.give_up_gap(self.source, "open", self.bus.gaps(self.source).get("open", gap).record)
            return
        # The stream (or a heartbeat) showed these ids, but REST does not have them yet: ask again
        # later, for as long as the trades could still matter (the retention window).
        now = time.monotonic()
        wait = self.waiting.get(gap.field)
        if wait is None or wait.record != gap.record:
            wait = GapWait(gap.record, 0, now, now, 0.0)
        if self._gap_age_ms(gap, wait, now) > self.retention_ms:
            self.waiting.pop(gap.field, None)
            self._give_up(gap, "REST did not have these ids within the retention window")
            return
        delay = min(GAP_RETRY_CAP_S, GAP_RETRY_BASE_S * 2 ** min(wait.tries, 16))
        wait = wait._replace(tries=wait.tries + 1, next_at=now + delay)
        if now - wait.since >= GAP_ALARM_AFTER_S and now - wait.alarmed_at >= GAP_ALARM_EVERY_S:
            wait = wait._replace(alarmed_at=now)
            record_event(self.bus.client, self.log, "ingest", "gap_waiting_for_rest", level="error",
                         source=self.source, first_missing=gap.first, last_missing=gap.last,
                         waited_s=round(now - wait.since, 1), retry_in_s=round(delay, 2))
        self.waiting[gap.field] = wait

    @staticmethod
    def _gap_age_ms(gap, wait: GapWait, now: float) -> float:
        """How old the missing trades are: by the exchange time of the trade before them when the
        record has it, else by how long this process has waited for them."""
        if gap.before is not None:
            return time.time() * 1000 - gap.before
        return (now - wait.since) * 1000

    def _give_up(self, gap, why: str, keep_from: int = None) -> None:
        last = gap.last if keep_from is None else keep_from - 1
        if gap.last is not None:
            last = min(last, gap.last)
        record_event(self.bus.client, self.log, "ingest", "gap_unfillable", level="error", source=self.source,
                     first_missing=gap.first, last_missing=last, why=why)
        self.bus.give_up_gap(self.source, gap.field, gap.record, keep_from)
        self.waiting.pop(gap.field, None)

    # --- quarantine ----------------------------------------------------------------------------
    def ask_about_quarantine(self) -> bool:
        """Ask REST about a quarantined id (the head of its cluster) that is due; True when asked."""
        now = time.monotonic()
        self.asked = {key: value for key, value in self.asked.items() if key in self.feed.quarantine.held}
        due = [head for head in self.feed.quarantine.heads() if self.asked.get(head.id, (0, 0.0))[1] <= now]
        item = due[0] if due else None
        if item is None:
            return False
        answer = self._rest_page(item.id, item.after_ts)
        if answer is None:
            return True
        verdict = _rest_verdict(item.id, answer[0])
        tries = self.asked.get(item.id, (0, 0.0))[0]
        if verdict is None:          # REST has nothing at or after it (yet): ask again later
            delay = min(QUARANTINE_RETRY_CAP_S, QUARANTINE_RETRY_BASE_S * 2 ** min(tries, 16))
            self.asked[item.id] = (tries + 1, now + delay)
            return True
        self.asked[item.id] = (tries + 1, now + 1.0)    # until the feed thread has taken the verdict
        while not self.stopping.is_set():
            try:
                self.feed.inbox.put(("quarantine", None, (item.id,) + verdict), timeout=0.5)
                break
            except queue.Full:
                continue
        return True

    # --- REST ----------------------------------------------------------------------------------
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
                self.log.warning("rest_failed", source=self.source, error=str(exc)[:200],
                                 retry_in_s=round(delay, 2))
                self.stopping.wait(delay)
        return None


def _run_from(page, first: int, last: Optional[int]) -> list:
    """The trades of page (ids ascending) that continue the sequence from first without a hole,
    up to last (None: no bound)."""
    run = []
    for trade in page:
        if trade.id != first + len(run) or (last is not None and trade.id > last):
            break
        run.append(trade)
    return run


def _rest_verdict(item_id: int, page):
    """What a REST page from item_id says of it: (True, why) it exists, (False, why) it does not,
    or None when REST has nothing at or after it yet."""
    ids = [t.id for t in page if t.id >= item_id]
    ids += [row.id for row in getattr(page, "rejected", ()) if row.id is not None and row.id >= item_id]
    if item_id in ids:
        return True, "REST has it"
    if ids:
        return False, f"REST skips it (its next id is {min(ids)})"
    return None


class SourceFeed(threading.Thread):
    """One source: its connections, the sequencer (dedup, gap detection, backfill) and bus writes."""

    def __init__(self, source, cfg, bus: Bus, log, stopping: threading.Event):
        super().__init__(name=f"feed:{source.name}", daemon=True)
        self.source = source.name
        self.symbol = source.symbol
        self.adapter = adapter_for(source, cfg)
        self.ws_url = self.adapter.ws_url
        self.max_conn_s = cfg.max_conn_hours * 3600
        self.linger_s = cfg.linger_ms / 1000
        self.pending_since = None
        self.retention_ms = cfg.retention_ms
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
        self.last_id_ms = None        # when last_id was reached (local wall ms): how far ids may jump
        self.cursor_ts_at_start = None
        self.quarantine = Quarantine()
        self._next_quarantine_check = 0.0
        self.pending = []
        self.resets = 0               # times ingest restarted from the local cursor
        self.crashed = None
        self.say_full = Throttle(BUS_FULL_ALARM_EVERY_S)
        self.say_held = Throttle(HELD_ALARM_EVERY_S)
        # cut_messages: connections that ended inside a message; cut_ids_recovered: of which the
        # received part named the trade's id (and the backfill fetched up to it).
        # quarantined: implausible forward ids held; quarantine_confirmed / quarantine_dropped: of
        # which REST confirmed / that were refuted (never a trade, never the cursor).
        self.counts = dict(trades=0, duplicates=0, gaps=0, backfilled=0, deadlettered=0,
                           reconnects=0, batches=0, last_trade_ts=0, cut_messages=0, cut_ids_recovered=0,
                           quarantined=0, quarantine_confirmed=0, quarantine_dropped=0)
        self.backfiller = Backfiller(self)

    # --- thread body -------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._claim_id_space()
            self.last_id = self.bus.cursor(self.source)
            if self.last_id is not None:
                # The cursor's trade time, when known, bounds how far the first ids may jump.
                self.cursor_ts_at_start = self.bus.cursor_time(self.source)
                self.last_id_ms = self.cursor_ts_at_start or int(time.time() * 1000)
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
            # The REST client's kept connections; a request still under way closes its own when done.
            self.adapter.close()

    def _claim_id_space(self) -> None:
        """Binance trade ids and aggregate ids are different sequences: state kept for the other
        kind is dropped (and said once), and this kind starts from the live stream like a first start."""
        dropped = self.bus.claim_id_space(self.source, self.adapter.id_space)
        if dropped:
            record_event(self.bus.client, self.log, "ingest", "id_space_changed", level="warning",
                         source=self.source, old=dropped["old"], new=self.adapter.id_space,
                         dropped_cursor=dropped["cursor"], dropped_gaps=dropped["gaps"],
                         note="starting from the live stream; the other kind's ids are never compared")

    def step(self, now: float) -> None:
        self.manage_connections(now)
        if self.quarantine.held and now >= self._next_quarantine_check:
            self._next_quarantine_check = now + 0.5
            self._expire_quarantine()
        try:
            kind, conn, data = self.inbox.get(timeout=max(0.0, self._linger_left(now)) if self.pending
                                              else self._idle_wait(now))
        except queue.Empty:
            self.flush()
            return
        now = time.monotonic()
        self.handle(kind, conn, data, now)
        if self.pending and self.pending_since is None:
            self.pending_since = now
        if self.inbox.empty() and self._linger_left(time.monotonic()) <= 0:
            self.flush()

    def _idle_wait(self, now: float) -> float:
        """Nothing pending: how long to wait for a message, until the next timed duty at the latest
        (a reconnect due, the quarantine's check); an idle feed thread wakes once a second."""
        due = [IDLE_WAIT_S]
        if self.current is None and self.replacement is None:
            due.append(self.next_connect_at - now)
        if self.quarantine.held:
            due.append(self._next_quarantine_check - now)
        return max(0.0, min(due))

    def _linger_left(self, now: float) -> float:
        """How much longer the pending trades may wait for more (BTCFEED_LINGER_MS from the first):
        at a real rate trades come one per message, and a bus entry, a writer round and a primary
        round trip per trade is what the feed would otherwise cost."""
        return (self.pending_since or now) + self.linger_s - now

    # --- connections -------------------------------------------------------------------------
    def manage_connections(self, now: float) -> None:
        if self.current is None and self.replacement is None and now >= self.next_connect_at:
            self.current = self._open()
        elif (self.current is not None and self.replacement is None and self.current.opened_at is not None
              and now - self.current.opened_at >= self.max_conn_s):
            # Before the exchange's 24 h cut: open the new connection first, close the old one after.
            self.log.info("proactive_reconnect", source=self.source,
                          age_s=round(now - self.current.opened_at))
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
        elif kind == "quarantine":
            self._quarantine_verdict(*data)
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
        if exchange_last_id is None or self.last_id is None:
            return
        now_ms = int(time.time() * 1000)
        if self.quarantine.held:
            self._refute_quarantined(exchange_last_id, now_ms, "a later heartbeat names a lower newest id")
        if exchange_last_id <= self.last_id:
            return
        if not self._plausible(exchange_last_id, now_ms):
            self._quarantine(Held(exchange_last_id, None, "heartbeat", now_ms, self._last_trade_ts()))
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
        if newest_id > self.last_id:
            self.last_id = newest_id
            self.last_id_ms = int(time.time() * 1000)

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
            # The connection died inside a trade message: that trade exists, fetch up to it (once
            # REST confirms it, if the id is implausibly far ahead).
            now_ms = int(time.time() * 1000)
            if self._plausible(conn.cut_id, now_ms):
                self._note_gap(conn.cut_id, "cut message")
            else:
                self._quarantine(Held(conn.cut_id, None, "cut message", now_ms, self._last_trade_ts()))
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
                         source=self.source, connection=conn.number, reason=reason,
                         retry_in_s=round(delay, 2))

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
        self._sequence(trade)

    def _sequence(self, trade) -> None:
        if self.last_id is not None and trade.id <= self.last_id:
            self.counts["duplicates"] += 1
            return
        if self.last_id is not None and trade.id > self.last_id + 1:
            if not self._plausible(trade.id, trade.rts):
                # REST paging by time looks from the trade's own time (never before our last trade's:
                # a forged time in the past must not send it reading through old pages).
                after_ts = max(trade.ts, self._last_trade_ts() or 0)
                self._quarantine(Held(trade.id, trade, "stream", trade.rts, after_ts))
                return
            # A bus batch holds contiguous ids: the publish of the next one records the skipped
            # ids as a gap, which the backfill fills while live trades keep flowing.
            self.flush()
        self._append(trade)

    # --- quarantine of implausible forward ids --------------------------------------------------
    def _plausible(self, new_id: int, at_ms: int) -> bool:
        """Whether the exchange could have printed trades up to new_id since we reached last_id."""
        if self.last_id is None or self.last_id_ms is None:
            return True
        elapsed_s = max(0.0, (at_ms - self.last_id_ms) / 1000.0)
        return new_id - self.last_id <= PLAUSIBLE_JUMP_IDS + MAX_PLAUSIBLE_TRADES_PER_S * elapsed_s

    def _last_trade_ts(self) -> Optional[int]:
        """The exchange time of our last trade (where a REST search by time for a newer id starts)."""
        return self.counts["last_trade_ts"] or self.cursor_ts_at_start

    def _quarantine(self, item: Held) -> None:
        """Hold an implausible id: it moves nothing until REST confirms it (see Backfiller)."""
        first = not self.quarantine.held
        if not self.quarantine.hold(item):
            return
        self.counts["quarantined"] += 1
        if first or item.trade is None:
            self.log.warning("implausible_id_quarantined", source=self.source, id=item.id,
                             seen_in=item.seen_in, after=self.last_id, ahead=item.id - self.last_id)
        self.backfiller.wake.set()

    def _quarantine_verdict(self, item_id: int, exists: bool, why: str) -> None:
        """REST's answer about a quarantined id, applied on the feed thread (which owns the cursor)."""
        item = self.quarantine.pop(item_id)
        if item is None:
            return              # passed by the live stream, or refuted, meanwhile
        if not exists:
            self._drop_quarantined(item, why)
            return
        self.counts["quarantine_confirmed"] += 1
        self.log.info("implausible_id_confirmed", source=self.source, id=item.id, seen_in=item.seen_in,
                      why=why)
        if self.last_id is None or item.id > self.last_id:
            if item.trade is not None:
                self.flush()
                self._append(item.trade)
            else:
                self._note_gap(item.id, item.seen_in)
        # What was held beside it is judged again from the new cursor (what it passed is dropped
        # quietly: those ids are now in the gap before it, and REST brings the real trades).
        for held in self.quarantine.take(lambda other: False):
            if self.last_id is not None and held.id <= self.last_id:
                continue
            if held.trade is not None:
                self._sequence(held.trade)
            elif self.last_id is not None and held.id > self.last_id:
                if self._plausible(held.id, held.seen_ms):
                    self._note_gap(held.id, held.seen_in)
                else:
                    self.quarantine.hold(held)

    def _refute_quarantined(self, newer_id: int, at_ms: int, why: str) -> None:
        """The exchange showed trade newer_id as its newest at at_ms: every held id above it that was
        seen clearly before then never existed."""
        margin = QUARANTINE_EVIDENCE_MARGIN_MS
        passed = self.quarantine.take(lambda item: item.id > self.last_id)
        refuted = self.quarantine.take(
            lambda item: not (item.id > newer_id and at_ms > item.seen_ms + margin))
        for item in refuted:
            self._drop_quarantined(item, why)
        if passed:
            self.log.info("quarantine_passed", source=self.source, ids=len(passed), last_id=self.last_id)

    def _expire_quarantine(self) -> None:
        limit_ms = int(time.time() * 1000) - QUARANTINE_MAX_WAIT_S * 1000
        for item in self.quarantine.take(lambda item: item.seen_ms >= limit_ms):
            self._drop_quarantined(item, f"REST did not confirm it within {QUARANTINE_MAX_WAIT_S:.0f}s")

    def _drop_quarantined(self, item: Held, why: str) -> None:
        self.counts["quarantine_dropped"] += 1
        record_event(self.bus.client, self.log, "ingest", "implausible_id_dropped", level="warning",
                     source=self.source, id=item.id, seen_in=item.seen_in, cursor=self.last_id, why=why)
        if item.trade is not None:
            self.reject(f"implausible trade id dropped: {why}", orjson.dumps(item.trade._asdict()))

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
            self.last_id_ms = chunk[-1].rts
            self.counts["last_trade_ts"] = chunk[-1].ts
            self.counts["last_price"] = chunk[-1].p
            if len(self.pending) >= BUS_BATCH_MAX:
                self.flush()
            if self.resets != resets:
                return      # restarted from the local cursor: the backfill brings the rest
        if self.quarantine.held:
            self._refute_quarantined(self.last_id, self.counts["last_trade_ts"],
                                     "a later trade has a lower id")

    def _append(self, trade) -> None:
        self.pending.append(trade)
        self.last_id = trade.id
        self.last_id_ms = trade.rts
        self.counts["last_trade_ts"] = trade.ts
        self.counts["last_price"] = trade.p
        if self.quarantine.held:
            self._refute_quarantined(trade.id, trade.ts, "a later trade has a lower id")
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
                self.pending_since = None
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
        if self.say_full.due():
            self.log.error("bus_full_ingest_held", source=self.source, max_entries=self.bus.max_entries)
        self.stopping.wait(0.2)

    def _local_redis_failed(self, exc: Exception) -> None:
        """Hold until the local Redis takes writes again (it is back, or has room again after being
        at its memory limit), then restart from its cursor: backfill covers the rest."""
        self._say_held(exc)
        dropped = 0
        while not self.stopping.is_set():
            self.stopping.wait(0.5)
            try:
                cursor = self.bus.cursor(self.source)
            except redis.RedisError as again:
                self._say_held(again)
                continue
            dropped += len(self.pending)
            self.resets += 1
            self.pending, self.pending_since = [], None
            self.last_id = cursor
            self.last_id_ms = int(time.time() * 1000)
            try:
                self.bus.open_gap(self.source)      # what the lost trades were, REST brings back
            except redis.RedisError as again:
                self._say_held(again)               # reads work at the memory limit, writes do not
                continue
            self.log.info("local_redis_back", source=self.source, cursor=cursor, dropped_pending=dropped)
            self.backfiller.wake.set()
            return

    def _say_held(self, exc: Exception) -> None:
        """One line per HELD_ALARM_EVERY_S while the local Redis refuses ingest's writes: a long outage
        at its memory limit would otherwise log twice a second for hours."""
        if not self.say_held.due():
            return
        event = ("local_redis_full_ingest_held" if isinstance(exc, redis.exceptions.OutOfMemoryError)
                 else "local_redis_unavailable")
        self.log.error(event, source=self.source, error=_reason(exc))

    def stats(self) -> dict:
        return {**self.counts, **self.backfiller.progress, "source": self.source,
                "connected": self.current is not None, "last_id": self.last_id, "pending": len(self.pending),
                "quarantine": len(self.quarantine)}


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
        self.stopping.wait(1.0)
        for feed in self.feeds:
            if feed.crashed is not None:
                self.exit_code = EXIT_FAILURE
                self.stopping.set()

    def shutdown(self) -> None:
        self.stopping.set()
        for feed in getattr(self, "feeds", []):
            try:
                feed.inbox.put_nowait(("stop", None, None))    # wakes an idle feed thread at once
            except queue.Full:
                pass                                            # a busy one sees the stop anyway
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
