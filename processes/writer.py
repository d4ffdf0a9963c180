"""writer: bus batches -> the primary Redis (and the local copy), ACKed only once durable.

States (DESIGN.md §4), kept in the local Redis so sync can see and change them:
  primary   apply to the primary; once it confirmed, keep the batch in the local mirror stream
            and ACK it, in one script on the local Redis (one round trip to each server per round);
  failover  the primary failed: apply to the local copy, append to the backlog and ACK, atomically;
  draining  as failover, while sync replays the backlog into the primary; sync hands back.
"""

import time

import redis

from btcfeed.storage import backlog, epochs, schema

from btcfeed import keys, price
from btcfeed.storage.apply import BatchApplier, compressed_batch, is_source_refusal
from btcfeed.storage.dedicated import DedicatedConnection
from btcfeed.config import ConfigError, redact_url
from btcfeed.backoff import Throttle
from btcfeed.events import record_event
from btcfeed.latency import LatencyHistogram, newest_trade_ts
from btcfeed.lifecycle import Process, run_process
from btcfeed.storage.primary import connect_primary
from btcfeed.storage.view import APPEND_TO_VIEW_LUA, wake_builder, writer_view_part
# The state names and describe_error live in a library module (tools must not import a process);
# they stay importable from here, DRAINING too, which the writer itself does not use.
from btcfeed.storage.writerstate import DRAINING  # noqa: F401
from btcfeed.storage.writerstate import FAILOVER, PRIMARY, describe_error, read_state, set_state

CONSUMER = "writer"
READ_COUNT = 64                 # bus entries per read (each holds up to 2,000 trades)
# An idle writer wakes once a second (the state it reads then only shows in its heartbeat; a batch
# learns the state from the ACK script); well below supervisord's stopwaitsecs.
READ_BLOCK_MS = 1000
LOCAL_RETRY_PAUSE_S = 0.5
BACKLOG_FULL_ALARM_EVERY_S = 10.0
# At the local Redis's memory limit the oldest tenth of each mirror goes (the primary confirmed every
# mirrored batch, so only the depth of the local copy shrinks), then the write is tried again.
MIRROR_SHARE_DROPPED = 0.1
MIRROR_TRIM_ROUNDS = 30
MEMORY_HEADROOM = 0.1           # ... until this share of maxmemory is free again
MEMORY_CHECK_EVERY_S = 2.0


# Trim the bus below the oldest entry still pending (or below the newest ACKed one when nothing
# is pending): an entry that was delivered but not ACKed is never trimmed away.
TRIM_BUS_LUA = """
local function trim_bus(bus, group, floor)
  local pending = redis.call('XPENDING', bus, group)
  if pending[1] > 0 then
    local pms, pseq = string.match(pending[2], '(%d+)-(%d+)')
    local fms, fseq = string.match(floor, '(%d+)-(%d+)')
    pms, pseq, fms, fseq = tonumber(pms), tonumber(pseq), tonumber(fms), tonumber(fseq)
    if pms < fms or (pms == fms and pseq < fseq) then floor = pending[2] end
  end
  return redis.call('XTRIM', bus, 'MINID', '~', floor)
end
"""
# KEYS bus; ARGV group, floor
TRIM_BUS_SCRIPT = TRIM_BUS_LUA + "return trim_bus(KEYS[1], ARGV[1], ARGV[2])"

# The batches the primary confirmed: kept in the mirror (compressed payloads, trimmed to the retention
# window) and, when they can be, appended to the read view (storage/view.py APPEND_TO_VIEW_LUA), their
# bus entries ACKed and the bus trimmed as above, the newest mirror entry of each source recorded for
# sync's held index, the price view stored; returns the writer state (sync may have asked for
# failover). A crash before it leaves the entries pending: they are applied again (a no-op in the
# primary) and mirrored then.
# KEYS bus, mirror-confirmed hash, writer state, price view, then per batch its source's mirror stream,
# view, view state and view wake list
# ARGV group, bus trim floor, mirror MINID, number of bus ids, the ids, then per batch: source, payload
# field name, payload, and its view part (first id, id after the last, view entry id); then the price
# view's field/value pairs
ACK_SCRIPT = TRIM_BUS_LUA + APPEND_TO_VIEW_LUA + """
local group, floor, minid, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local at = 5 + n
for k = 5, #KEYS, 4 do
  local source, name, payload = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  local tip = redis.call('HGET', KEYS[2], source)
  local entry = redis.call('XADD', KEYS[k], 'MINID', '~', minid, '*', name, payload)
  redis.call('HSET', KEYS[2], source, entry)
  append_to_view(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], tip, entry, ARGV[at + 3], ARGV[at + 4],
                 ARGV[at + 5], name, payload)
  at = at + 6
end
if at <= #ARGV then redis.call('HSET', KEYS[4], unpack(ARGV, at, #ARGV)) end
redis.call('XACK', KEYS[1], group, unpack(ARGV, 5, 4 + n))
trim_bus(KEYS[1], group, floor)
return redis.call('HGET', KEYS[3], 'state')
"""

# At the memory limit the oldest part of a source's local stream goes, and in the same step the time
# of the oldest entry left is recorded as the source's window cut (keys.LOCAL_WINDOW_CUT: health reports
# the shorter local copy from it), so a crash can never leave a cut that nobody reports.
DROP_OLDEST_LUA = """
local function drop_oldest(stream, cuts, source, kept)
  local dropped = redis.call('XTRIM', stream, 'MAXLEN', math.floor(redis.call('XLEN', stream) * kept))
  if dropped > 0 then
    local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    local cut = oldest and tonumber(string.match(oldest[1], '^(%d+)'))
    if not cut then
      local now = redis.call('TIME')
      cut = now[1] * 1000 + math.floor(now[2] / 1000)
    end
    if cut > tonumber(redis.call('HGET', cuts, source) or '0') then redis.call('HSET', cuts, source, cut) end
  end
  return dropped
end
"""
# The mirror first (the primary confirmed every mirrored batch, so only the local copy's depth shrinks).
# KEYS the source's mirror, window cuts; ARGV source, the share kept
DROP_OLDEST_MIRRORED_SCRIPT = DROP_OLDEST_LUA + """
return drop_oldest(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]))
"""
# With nothing mirrored left to drop: the oldest part of a source's failover copy (its local trade
# stream), but only while the writer is on the primary with an empty backlog, i.e. once sync replayed
# every batch of it into the primary (the hand-back needs an empty backlog); checked and trimmed in one
# step. Without it a local Redis filled by a long outage stays full after the hand-back, and the writer
# cannot mirror what the primary confirms.
# KEYS writer state, backlog, the source's local trade stream, window cuts; ARGV source, the share kept
DROP_REPLAYED_COPY_SCRIPT = DROP_OLDEST_LUA + """
local state = redis.call('HGET', KEYS[1], 'state')
if (state and state ~= 'primary') or redis.call('XLEN', KEYS[2]) > 0 then return 0 end
return drop_oldest(KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[2]))
"""


class PrimaryFailed(Exception):
    """The primary did not confirm a batch; the cause is the Redis error."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class Writer(Process):
    name = "writer"
    uses_primary = True

    def initialize(self) -> None:
        cfg = self.config
        refusal = schema.problem(schema.claim(self.local))
        if refusal:
            raise ConfigError(refusal)
        compat = cfg.compat_source.name if cfg.compat_source else None
        self.primary = connect_primary(cfg, cfg.primary_timeout_ms)
        # The epochs sync verified: the apply script refuses a primary that does not hold them.
        self.epochs = {}
        self.to_primary = BatchApplier(self.primary, cfg.retention_ms, compat, cfg.compat_history_len,
                                       epochs=self.epochs)
        if not isinstance(self.primary, redis.RedisCluster):
            self.to_primary.round_trips = DedicatedConnection(self.primary)
        self.to_local = BatchApplier(self.local, cfg.retention_ms, compat, cfg.compat_history_len,
                                     publish=False)
        self.price = self._price_selector()
        self.ack_script = self.local.register_script(ACK_SCRIPT)
        self.drop_oldest_mirrored_script = self.local.register_script(DROP_OLDEST_MIRRORED_SCRIPT)
        self.drop_replayed_copy_script = self.local.register_script(DROP_REPLAYED_COPY_SCRIPT)
        # The bus read and the mirror-and-ACK of every round, on one connection of their own.
        self.round_trips = DedicatedConnection(self.local)
        self._ensure_group()
        # Entries delivered before a crash and never ACKed come first; then new ones.
        self.read_from = "0"
        self._first_contact()
        self.state = None
        self._observe_state(read_state(self.local))
        self.say_backlog_full = Throttle(BACKLOG_FULL_ALARM_EVERY_S)
        self.say_memory_full = Throttle(BACKLOG_FULL_ALARM_EVERY_S)
        self.say_refused = Throttle(BACKLOG_FULL_ALARM_EVERY_S)          # per source
        self._last_memory_check = 0.0
        self.memory_full = False
        self.counts = dict(applied=0, skipped=0, batches=0, primary_errors=0, to_backlog=0,
                           last_apply_ms=0, last_trade_ts=0)
        self.latency = LatencyHistogram()
        self.log.info("writer_ready", primary=redact_url(cfg.primary_url), state=self.state)

    def _ensure_group(self) -> None:
        try:
            self.local.xgroup_create(keys.BUS, keys.BUS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _first_contact(self) -> None:
        """A source whose epoch this host never verified (a new state dir, a new source): adopt or create
        it now, so the first batch is not refused; sync's sweep at its start covers what the primary lacks.
        With the primary down, sync does it when the primary is back."""
        sources = [source.name for source in self.config.sources]
        if set(epochs.known_epochs(self.local)) >= set(sources):
            return
        try:
            changed = epochs.establish(self.local, self.primary, sources)
        except redis.RedisError as exc:
            self.log.warning("epoch_unverified", reason=describe_error(exc, self.config.primary_url))
            return
        if changed:
            self.log.info("epoch_established", sources=",".join(changed))

    def _price_selector(self) -> price.PriceSelector:
        """Carry on with the source the view had before a restart (its newest id, so it never goes back)."""
        stored = price.read_view(self.local)
        selector = price.PriceSelector([source.name for source in self.config.price_sources],
                                       self.config.price_stale_ms, stored.get("source"),
                                       int(stored.get("id", -1)))
        selector.since_ms = int(stored.get("since", 0))
        self._follow_price_source(selector.current)
        return selector

    def _follow_price_source(self, source) -> None:
        """The compatibility keys give the price view's price."""
        if self.config.compat_source is not None and source is not None:
            self.to_primary.compat_source = self.to_local.compat_source = source

    def _price_round(self, batches):
        """The price view after these batches (a mapping to store), or None when it has not moved."""
        for source, payload in batches:
            self.price.observe(source, price.newest_row(payload))
        now_ms = int(time.time() * 1000)
        switch = self.price.choose(now_ms)
        if switch is not None:
            self._follow_price_source(switch.source)
            if switch.previous is not None:
                record_event(self.local, self.log, self.name, "price_source_switch", level="warning",
                             source=switch.source, previous=switch.previous, reason=switch.reason)
        return self.price.update(now_ms)

    def _observe_state(self, state: str) -> None:
        """Take the writer state from the local Redis; on a hand-back, the epochs sync verified."""
        if state == PRIMARY and self.state != PRIMARY:
            self.epochs.clear()
            self.epochs.update({k.decode(): v.decode() for k, v in self.local.hgetall(keys.EPOCHS).items()})
        self.state = state

    # --- main loop -----------------------------------------------------------------------------
    def loop_once(self, now: float) -> None:
        # Primary errors are handled inside write(); anything else here is the local Redis, and
        # after any local error the pending entries are read again first (read_from "0"), so an
        # entry whose commit was cut off is never skipped.
        try:
            self._watch_memory(now)
            entries = self._read()
            if entries:
                self.write(entries)
        except redis.RedisError as exc:
            self._local_failed(exc)

    def _watch_memory(self, now: float) -> None:
        """Keep the local Redis below its memory limit before anything is refused: when ingest's bus
        write is the one refused, the writer has nothing to write and would never notice."""
        if now - self._last_memory_check < MEMORY_CHECK_EVERY_S:
            return
        self._last_memory_check = now
        used, limit = self._memory()
        if limit and used >= limit * (1 - MEMORY_HEADROOM):
            self._relieve_memory(f"used {used} of {limit} bytes")
        elif self.memory_full:
            self._memory_relieved(force=True)

    def _read(self):
        block = () if self.read_from == "0" else ("BLOCK", READ_BLOCK_MS)
        reply = self.round_trips.call("XREADGROUP", "GROUP", keys.BUS_GROUP, CONSUMER, "COUNT", READ_COUNT,
                                      *block, "STREAMS", keys.BUS, self.read_from)
        entries = reply[0][1] if reply else []
        if self.read_from == "0" and not entries:
            self.read_from = ">"
        if not entries:
            self._observe_state(read_state(self.local))
        return self._without_vanished(entries)

    def _without_vanished(self, entries):
        """Pending entries whose data is gone cannot be applied; ACK them so they stop coming back."""
        vanished = [entry_id for entry_id, fields in entries if not fields]
        if vanished:
            self.local.xack(keys.BUS, keys.BUS_GROUP, *vanished)
            record_event(self.local, self.log, self.name, "bus_entry_vanished", level="error",
                         entries=len(vanished), first=vanished[0].decode())
        return [entry for entry in entries if entry[1]]

    def write(self, entries) -> None:
        """Make the entries durable in the primary or in the local copy + backlog, then ACK them."""
        batches = [(fields[b"src"].decode(), fields[b"t"]) for _, fields in entries]
        ids = [entry_id for entry_id, _ in entries]
        view = self._price_round(batches)
        while not self.stopping.is_set():
            try:
                if self._write_once(ids, batches, view, entries):
                    self._memory_relieved()
                    return
            except redis.exceptions.OutOfMemoryError as exc:
                self._relieve_memory(exc)

    def _write_once(self, ids, batches, view, entries) -> bool:
        """One try: True once the entries are durable and ACKed (with the price view, when it moved)."""
        if self.state == PRIMARY:
            try:
                self._apply_to_primary(batches, view)
            except PrimaryFailed as failure:
                self._fail_over(failure.cause)
                return False
            self._mirror_and_ack(ids, batches, view)
            return True
        try:
            return self._commit_to_backlog(ids, entries, view)
        except redis.WatchError:
            # sync changed the state meanwhile (or the connection broke while watching, which
            # the read below turns into a local failure): decide again; a repeated apply is harmless.
            self._observe_state(read_state(self.local))
            return False

    def _apply_to_primary(self, batches, view) -> None:
        """One pipelined round trip to the primary (the batches and the price view); a primary error
        becomes PrimaryFailed."""
        now_ms = int(time.time() * 1000)
        then = [price.write_view_command(view)] if view else ()
        try:
            results = self.to_primary.apply_many(batches, None, False, then)
        except redis.RedisError as exc:
            raise PrimaryFailed(exc)
        results = self._set_aside_refusals(batches, results)
        self.counts["applied"] += sum(r[0] for r in results)
        self.counts["skipped"] += sum(r[1] for r in results)
        self.counts["batches"] += len(batches)
        self.counts["last_apply_ms"] = now_ms
        self._observe_latency(batches)

    def _set_aside_refusals(self, batches, results) -> list:
        """The replies of the batches the primary applied. An error of the primary as a whole fails
        over (PrimaryFailed); a refusal that concerns one source's keys only (a key of the wrong
        type, its slot moving) leaves that batch to sync's anti-entropy and every other source on the
        primary: sources are isolated. The script stops before its first write, so nothing is half done."""
        errors = [result for result in results if isinstance(result, Exception)]
        for error in errors:
            if not is_source_refusal(error):
                raise PrimaryFailed(error)
        for (source, _), result in zip(batches, results):
            if isinstance(result, Exception):
                self._refused(source, result)
        return [result for result in results if not isinstance(result, Exception)]

    def _refused(self, source: str, error: Exception) -> None:
        self.counts["refused_batches"] = self.counts.get("refused_batches", 0) + 1
        if self.say_refused.due(source):
            record_event(self.local, self.log, self.name, "batch_refused", level="error", source=source,
                         reason=describe_error(error, self.config.primary_url),
                         refused_batches=self.counts["refused_batches"])

    def _observe_latency(self, batches) -> None:
        """Exchange time -> confirmed in the primary, for the newest trade of each batch."""
        confirmed_ms = time.time() * 1000
        for _, payload in batches:
            self.latency.observe(confirmed_ms - newest_trade_ts(payload))

    def _mirror_and_ack(self, ids, batches, view) -> None:
        """The primary holds the batches (a refused one too, once sync re-sends it): keep each in the
        local mirror as it is (one stream entry, not one per trade) for the retention window, which
        is what a re-seed or sync-check reads back, append it to the read view when it can, ACK the bus
        entries, and store the price view for the read API; one script, one round trip. The state it
        returns may be sync's failover."""
        state = self.round_trips.run_script(self.ack_script,
                                            *ack_script_input(ids, batches, view, self.config.retention_ms))
        self._observe_state(state.decode() if state else PRIMARY)

    def _commit_to_backlog(self, ids, entries, view) -> bool:
        """One transaction on the local Redis: the local copy, the backlog, the ACK and the bus trim.
        The round's batches go in coalesced by source (storage/backlog.py), one apply and one
        backlog entry each.

        WATCH on the state makes a backlog write and sync's hand-back exclusive: once sync has
        handed back (backlog empty -> primary), no batch can be added to the backlog any more.
        """
        now_ms = int(time.time() * 1000)
        merged = backlog.coalesce([(fields[b"src"].decode(), fields[b"t"], backlog.batch_trades(fields))
                                   for _, fields in entries], self.config.writer_max_batch)
        incoming = sum(trades for _, _, trades in merged)
        with self.local.pipeline(transaction=True) as pipe:
            pipe.watch(keys.WRITER_STATE)
            state = read_state(pipe)
            if state == PRIMARY:
                self._observe_state(PRIMARY)      # handed back since we looked: the primary takes these
                return False
            held = backlog.held_trades(pipe)
            # Over the bound only from an empty backlog (a round bigger than the bound must still go).
            if held and held + incoming > self.config.backlog_max_trades:
                self._backlog_full(held)
                return False
            pipe.multi()
            for source, payload, trades in merged:
                self.to_local.queue_in_transaction(pipe, source, payload)
                backlog.queue_append(pipe, source, payload, trades)
                wake_builder(pipe, source)
            if view:
                pipe.hset(keys.PRICE, mapping=view)
            pipe.xack(keys.BUS, keys.BUS_GROUP, *ids)
            pipe.eval(TRIM_BUS_SCRIPT, 1, keys.BUS, keys.BUS_GROUP, _next_id(ids[-1]))
            pipe.execute()
        self._observe_state(state)
        self.counts["to_backlog"] += len(entries)
        self.counts["last_apply_ms"] = now_ms
        return True

    # --- failures ------------------------------------------------------------------------------
    def _fail_over(self, exc: Exception) -> None:
        self.counts["primary_errors"] += 1
        reason = describe_error(exc, self.config.primary_url)
        try:
            if read_state(self.local) == PRIMARY:
                set_state(self.local, FAILOVER, reason)
                record_event(self.local, self.log, self.name, "failover", level="error",
                             primary=redact_url(self.config.primary_url), reason=reason)
            self.state = FAILOVER
        except redis.RedisError as local_exc:
            self._local_failed(local_exc)

    def _backlog_full(self, held: int) -> None:
        # Never drop: stop consuming the bus; it fills and ingest holds, with an alarm.
        if self.say_backlog_full.due():
            record_event(self.local, self.log, self.name, "backlog_full", level="error",
                         held_trades=held, max_trades=self.config.backlog_max_trades)
        self.stopping.wait(0.5)

    def _relieve_memory(self, cause) -> None:
        """The local Redis is at its memory limit: drop what the primary already holds (failover copies
        older than the window, the oldest mirrored batches, then the oldest of a failover copy sync
        replayed) until a tenth of the limit is free,
        say so, and try again; when nothing is left to drop, stop consuming, so the bus fills and
        ingest holds (never a silent loop)."""
        trimmed, now_ms = 0, int(time.time() * 1000)
        for source in self.config.sources:
            trimmed += self.local.xtrim(keys.trades(source.name),
                                        minid=max(0, now_ms - self.config.retention_ms))
        for _ in range(MIRROR_TRIM_ROUNDS):
            used, limit = self._memory()
            if not limit or used < limit * (1 - MEMORY_HEADROOM):
                break
            dropped = (sum(self._drop_oldest_mirrored(source.name) for source in self.config.sources)
                       or sum(self._drop_oldest_replayed(source.name) for source in self.config.sources))
            if not dropped:
                break
            trimmed += dropped
        reason = (f"local Redis at its memory limit ({str(cause)[:80]}); dropped {trimmed} entries the "
                  "primary holds")
        if not self.memory_full:
            self.memory_full = True
            self._try_local(self.local.hset, keys.LOCAL_PRESSURE,
                            mapping={"since": now_ms, "reason": reason, "trimmed": trimmed})
        if self.say_memory_full.due():
            self._try_local(record_event, self.local, self.log, self.name, "local_memory_full", level="error",
                            trimmed=trimmed, state=self.state)
        if not trimmed:
            self.stopping.wait(LOCAL_RETRY_PAUSE_S)

    def _memory(self):
        memory = self.local.info("memory")
        return int(memory.get("used_memory", 0)), int(memory.get("maxmemory", 0))

    def _drop_oldest_mirrored(self, source: str) -> int:
        return self.drop_oldest_mirrored_script(keys=[keys.mirror(source), keys.LOCAL_WINDOW_CUT],
                                                args=[source, 1 - MIRROR_SHARE_DROPPED])

    def _drop_oldest_replayed(self, source: str) -> int:
        return self.drop_replayed_copy_script(
            keys=[keys.WRITER_STATE, keys.BACKLOG, keys.trades(source), keys.LOCAL_WINDOW_CUT],
            args=[source, 1 - MIRROR_SHARE_DROPPED])

    def _memory_relieved(self, force: bool = False) -> None:
        """Leave the pressure state once the local Redis has its headroom back (checked now and then)."""
        if not self.memory_full:
            return
        if not force:
            if time.monotonic() - self._last_memory_check < MEMORY_CHECK_EVERY_S:
                return
            self._last_memory_check = time.monotonic()
            used, limit = self._memory()
            if limit and used >= limit * (1 - MEMORY_HEADROOM):
                return
        self.memory_full = False
        self._try_local(self.local.delete, keys.LOCAL_PRESSURE)
        self._try_local(record_event, self.local, self.log, self.name, "local_memory_ok")

    def _try_local(self, call, *args, **kwargs) -> None:
        """A write that only reports: the local Redis may still refuse it for memory."""
        try:
            call(*args, **kwargs)
        except redis.RedisError:
            pass

    def _local_failed(self, exc: Exception) -> None:
        self.log.error("local_redis_unavailable", error=f"{type(exc).__name__}: {str(exc)[:200]}")
        self.stopping.wait(LOCAL_RETRY_PAUSE_S)
        self.read_from = "0"
        try:
            self._ensure_group()
            self._observe_state(read_state(self.local))
        except redis.RedisError:
            pass

    def stats(self) -> dict:
        latency = getattr(self, "latency", None)
        return {**getattr(self, "counts", {}), "state": getattr(self, "state", None),
                "local_memory_full": getattr(self, "memory_full", False),
                "price_source": getattr(getattr(self, "price", None), "current", None),
                "latency": latency.snapshot() if latency else None,
                "primary_ok": getattr(self, "state", PRIMARY) == PRIMARY}


def ack_script_input(ids, batches, price_view, retention_ms: int):
    """ACK_SCRIPT's keys and args for these bus entry ids, their (source, payload) batches and the
    price view (None when it has not moved)."""
    minid = max(0, int(time.time() * 1000) - retention_ms)
    streams, args = [], []
    for source, payload in batches:
        (name, value), = compressed_batch(payload).items()
        streams += [keys.mirror(source), keys.view(source), keys.view_state(source), keys.view_wake(source)]
        args += [source, name, value, *writer_view_part(payload)]
    args += [part for item in (price_view or {}).items() for part in item]
    return ([keys.BUS, keys.MIRROR_CONFIRMED, keys.WRITER_STATE, keys.PRICE, *streams],
            [keys.BUS_GROUP, _next_id(ids[-1]), minid, len(ids), *ids, *args])


def _next_id(entry_id: bytes) -> str:
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq) + 1}"


def main(argv=None) -> int:
    return run_process(Writer, argv)


if __name__ == "__main__":
    raise SystemExit(main())
