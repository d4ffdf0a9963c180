"""sync: watches the primary, replays the backlog when it is healthy again, hands the writer back,
and keeps the primary holding everything the local copy holds (anti-entropy, common/storage/antientropy.py).

What it knows, rather than guesses:
  - the epoch (common/storage/epochs.py): a primary that lost btcfeed's data refuses the writer's next batch,
    sync verifies the epochs before it hands back, and a new epoch means a full sweep;
  - the seen-sets: every second the segments touched in the last RECENT_S are compared with the
    held index, every segment on a schedule and after any change of the primary; every trade the
    local copy holds and the primary lacks is re-sent through the idempotent apply.
Live trades are never held back for history: the backlog (the newest trades) is replayed and the
writer handed back first; a sweep re-sends the history behind them, newest segment first.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import redis

from btcfeed.storage import backlog, epochs, move

from btcfeed import keys, price
from btcfeed.storage.antientropy import HeldIndex, compare, resend
from btcfeed.storage.apply import BatchApplier, is_epoch_error, is_source_refusal
from btcfeed.config import redact_url
from btcfeed.events import record_event
from btcfeed.lifecycle import Process, run_process
from btcfeed.storage.primary import NotWritable, connect_primary, is_cluster, probe
from btcfeed.storage.writerstate import (DRAINING, FAILOVER, PRIMARY, describe_error, read_state, set_state,
                                         wait_for_change)

PRIMARY_ROUND_S = 1.0           # a round while the writer uses the primary (follow, watch, compare)
WATCH_INTERVAL_S = 1.0          # identity and epoch check of a healthy primary
REPLAY_ENTRIES = 16             # backlog entries per pipelined round trip (up to 32,000 trades)
REPLAY_TIMEOUT_MS = 5000        # replays send big pipelines; the probe keeps the short timeout
COMPARE_INTERVAL_S = 1.0        # recently touched segments are compared this often
RECENT_S = 30.0                 # ... and "recently" is this long
FULL_SWEEP_EVERY_S = 600.0      # every segment of the held index, compared this often
SWEEP_SEGMENTS_PER_STEP = 4     # a full sweep goes on between probes and hand-backs, this many at a time
FOLLOW_ENTRIES = 512            # mirrored batches taken into the held index per loop
REFUSAL_EVENT_EVERY_S = 10.0    # a source whose keys the primary refuses: one event this often

# Hand back only if the backlog is empty and nobody changed the state meanwhile: from here on the
# writer's WATCHed backlog transaction fails and it writes to the primary instead. The backlog's
# trade count starts again from zero. KEYS backlog, writer state, backlog trade count; ARGV now ms
HAND_BACK_SCRIPT = """
if redis.call('XLEN', KEYS[1]) == 0 and redis.call('HGET', KEYS[2], 'state') == 'draining' then
  redis.call('HSET', KEYS[2], 'state', 'primary', 'since', ARGV[1], 'reason', 'backlog replayed')
  redis.call('DEL', KEYS[3])
  return 1
end
return 0
"""


class PrimaryUnhealthy(Exception):
    """The probe's reason, in one line."""


class Sync(Process):
    name = "sync"
    uses_primary = True

    def initialize(self) -> None:
        cfg = self.config
        compat = cfg.compat_source.name if cfg.compat_source else None
        self.sources = [source.name for source in cfg.sources]
        self.cluster = is_cluster(cfg)
        self.probe_client = connect_primary(cfg, cfg.primary_timeout_ms)
        self.replay_client = connect_primary(cfg, max(cfg.primary_timeout_ms, REPLAY_TIMEOUT_MS))
        self.epochs = epochs.known_epochs(self.local)
        self.applier = BatchApplier(self.replay_client, cfg.retention_ms, compat, cfg.compat_history_len,
                                    epochs=self.epochs)
        self.indexes = {source: HeldIndex(self.local, source) for source in self.sources}
        self.hand_back_script = self.local.register_script(HAND_BACK_SCRIPT)
        self.delete_replayed_script = self.local.register_script(backlog.DELETE_REPLAYED_SCRIPT)
        self.replay_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay")
        self.streak = 0
        self.last_unhealthy_reason = None
        self.next_watch = 0.0
        self.next_compare = 0.0
        self.next_full_sweep = time.monotonic() + FULL_SWEEP_EVERY_S
        self.recent = {source: {} for source in self.sources}     # segment -> when last touched
        self.sweep = None
        self.drain = None
        self.follow_started_ms = 0
        self.verified_ms = 0
        self.unresolved = False
        self.last_refusal_event = {}
        self.counts = dict(replayed=0, reseeded=0, hand_backs=0, drains=0, replay_rate=0.0, repaired=0,
                           sweeps=0, compared_bytes=0, missing_found=0, not_held=0)
        # A sweep cut short (a crash, a restart) is taken up again from the start.
        pending = self.local.hget(keys.SYNC_PRIMARY, "sweep")
        self.schedule_sweep(pending.decode() if pending else "sync started", loss=bool(pending))

    def loop_once(self, now: float) -> None:
        self.follow_local_copy(now)
        state = read_state(self.local)
        if state == PRIMARY:
            self.drain = None
            self.watch_primary(now)
            if self.anti_entropy(now):
                return          # more of a sweep to do: no pause
            # Every check here runs once a second; a failover or a pause ends the wait at once.
            wait_for_change(self.local, PRIMARY_ROUND_S)
        elif state == FAILOVER:
            self.drain = None
            self.await_recovery()
            self.stopping.wait(self.config.probe_interval_ms / 1000)
        elif state == DRAINING:
            self.drain_step()
        else:                   # maintenance: the operator has the primary; nothing to probe or replay
            self.drain = None
            self.streak = 0
            self.settle_orphaned_move(now)
            self.stopping.wait(0.2)

    def settle_orphaned_move(self, now: float) -> None:
        """A `btcfeed primary move` that died while the writer was paused for it is finished (new
        primary recorded) or abandoned (back to the old one) here, so no crash leaves the feed paused."""
        if now < self.next_watch:
            return
        self.next_watch = now + WATCH_INTERVAL_S
        done = move.settle_orphaned(self.local)
        if done:
            record_event(self.local, self.log, self.name, done, level="warning",
                         reason="the move command is gone", primary=redact_url(self.config.primary_url))

    # --- probing -------------------------------------------------------------------------------
    def probe(self) -> dict:
        """One health check: answers, is a master, accepts a write. Returns the server's identity."""
        try:
            return probe(self.probe_client, self.cluster, self.sources)
        except NotWritable as exc:
            raise PrimaryUnhealthy(str(exc))
        except redis.RedisError as exc:
            raise PrimaryUnhealthy(describe_error(exc, self.config.primary_url))

    def remember(self, identity: dict, sweep: bool = True) -> None:
        """Keep the primary's identity; a new one (a restart, a promoted replica) means a full sweep
        (unless one is already scheduled for a new epoch)."""
        known = self.local.hget(keys.SYNC_PRIMARY, "run_id")
        run_id = identity["run_id"] or ""
        if known and run_id and known.decode() != run_id:
            record_event(self.local, self.log, self.name, "primary_restarted", level="warning",
                         primary=redact_url(self.config.primary_url))
            if sweep:
                self.schedule_sweep("primary restarted (new run_id)", loss=True)
        self.local.hset(keys.SYNC_PRIMARY, mapping={"run_id": run_id, "seen_ms": int(time.time() * 1000)})

    def watch_primary(self, now: float) -> None:
        """While the writer uses the primary: notice a lost epoch or a restart it cannot see itself
        (no trade written since, or the restart kept the epoch and lost only its last writes)."""
        if now < self.next_watch:
            return
        self.next_watch = now + WATCH_INTERVAL_S
        try:
            identity = self.probe()
            held = epochs.primary_epochs(self.probe_client, self.sources)
        except (PrimaryUnhealthy, redis.RedisError):
            return          # the writer fails over on its next write
        self.epochs.clear()
        self.epochs.update(epochs.known_epochs(self.local))     # the writer may have established some
        if any(source not in self.epochs for source in self.sources):
            self.first_contact()
            return
        lost = [source for source in self.sources if held[source] != self.epochs[source]]
        if lost:
            reason = f"primary lost btcfeed's epoch for {', '.join(lost)} (flushed or restarted empty)"
            set_state(self.local, FAILOVER, reason)
            record_event(self.local, self.log, self.name, "primary_changed", level="error", reason=reason,
                         primary=redact_url(self.config.primary_url))
            return
        self.remember(identity)

    def first_contact(self) -> None:
        """Sources whose epoch this host never verified (a new state dir or source): adopt or create
        them; whatever the primary may lack is found by the sweep that follows."""
        try:
            changed = epochs.establish(self.local, self.probe_client, self.sources)
        except redis.RedisError:
            return
        self.epochs.update(epochs.known_epochs(self.local))
        if changed:
            self.schedule_sweep(f"first contact with the primary for {', '.join(changed)}")

    def await_recovery(self) -> None:
        try:
            identity = self.probe()
        except PrimaryUnhealthy as exc:
            self.streak = 0
            if str(exc) != self.last_unhealthy_reason:
                self.last_unhealthy_reason = str(exc)
                record_event(self.local, self.log, self.name, "primary_unhealthy", level="warning",
                             reason=str(exc), primary=redact_url(self.config.primary_url))
            return
        self.streak += 1
        if self.streak < self.config.healthy_probes:
            return
        self.last_unhealthy_reason = None
        self.streak = 0
        try:
            changed = epochs.establish(self.local, self.probe_client, self.sources)
        except redis.RedisError as exc:
            record_event(self.local, self.log, self.name, "primary_unhealthy", level="warning",
                         reason=describe_error(exc, self.config.primary_url))
            return
        self.epochs.clear()
        self.epochs.update(epochs.known_epochs(self.local))
        if changed:
            self.schedule_sweep(f"primary holds a new epoch for {', '.join(changed)} (it lost btcfeed's data "
                                "or never had it)", loss=True)
        self.remember(identity, sweep=not changed)
        backlog = self.local.xlen(keys.BACKLOG)
        set_state(self.local, DRAINING, "primary healthy again")
        self.drain = {"started": time.monotonic(), "trades": 0, "entries": 0, "backlog_at_start": backlog,
                      "next": None}
        self.counts["drains"] += 1
        record_event(self.local, self.log, self.name, "drain_start", backlog_entries=backlog)

    # --- replay ---------------------------------------------------------------------------------
    def drain_step(self) -> None:
        if self.drain is None:   # restarted mid-drain: carry on
            self.drain = {"started": time.monotonic(), "trades": 0, "entries": 0,
                          "backlog_at_start": self.local.xlen(keys.BACKLOG), "next": None}
        entries = self.drain.get("next") or self.local.xrange(keys.BACKLOG, count=REPLAY_ENTRIES)
        self.drain["next"] = None
        if not entries:
            self.hand_back()
            return
        batches = [backlog.entry_batch(fields) for _, fields in entries]
        # The primary applies these while the next entries are read from the local Redis.
        self.applier.compat_source = price.compat_source_now(self.local, self.config)
        applying = self.replay_pool.submit(self.applier.apply_many, batches)
        try:
            following = self.local.xrange(keys.BACKLOG, min="(" + entries[-1][0].decode(),
                                          count=REPLAY_ENTRIES)
        finally:
            try:
                results = applying.result()
            except redis.RedisError as exc:
                results = None
                set_state(self.local, FAILOVER,
                          f"replay failed: {describe_error(exc, self.config.primary_url)}")
                record_event(self.local, self.log, self.name, "drain_failed", level="error",
                             reason=describe_error(exc, self.config.primary_url),
                             replayed=self.drain["trades"])
                self.drain = None
        if results is None:
            return
        # Replayed entries leave the backlog only after the primary confirmed them; a crash in
        # between replays them again, which the seen-set turns into a no-op.
        backlog.delete_replayed(self.delete_replayed_script, entries)
        self.drain["next"] = following
        replayed = sum(sum(result) for result in results)
        self.drain["trades"] += replayed
        self.drain["entries"] += len(entries)
        self.counts["replayed"] += replayed

    def hand_back(self) -> None:
        if not self.hand_back_script(keys=[keys.BACKLOG, keys.WRITER_STATE, keys.BACKLOG_TRADES],
                                     args=[int(time.time() * 1000)]):
            return
        seconds = time.monotonic() - self.drain["started"]
        rate = self.drain["trades"] / seconds if seconds > 0 else 0.0
        self.counts["hand_backs"] += 1
        self.counts["replay_rate"] = round(rate)
        record_event(self.local, self.log, self.name, "hand_back", replayed_trades=self.drain["trades"],
                     replayed_entries=self.drain["entries"], drain_s=round(seconds, 3),
                     replay_rate=round(rate))
        self.drain = None

    # --- anti-entropy ---------------------------------------------------------------------------
    def follow_local_copy(self, now: float) -> None:
        """Take what the local copy took in into the held index; remember the segments it touched."""
        self.follow_started_ms = int(time.time() * 1000)
        confirmed = self.local.hgetall(keys.MIRROR_CONFIRMED)
        for source, index in self.indexes.items():
            mirror_confirmed = confirmed.get(source.encode())
            try:
                touched = index.follow(mirror_confirmed.decode() if mirror_confirmed else None,
                                       FOLLOW_ENTRIES)
            except redis.exceptions.OutOfMemoryError:
                # The writer makes room (local memory pressure is its state); the index waits.
                index.caught_up = False
                continue
            for number in touched:
                self.recent[source][number] = now

    def schedule_sweep(self, reason: str, loss: bool = False) -> None:
        """Compare every segment of the held index, newest first; a sweep after a loss is a re-seed
        (events reseed_start / reseed_done) and survives a restart of sync."""
        if loss:
            self.local.hset(keys.SYNC_PRIMARY, "sweep", reason)
            record_event(self.local, self.log, self.name, "reseed_start", level="warning", reason=reason)
        self.sweep = {"reason": reason, "loss": loss, "started": time.monotonic(), "added": 0, "checked": 0,
                      "queue": [(source, number) for source in self.sources
                                for number in self.indexes[source].segments()]}

    def anti_entropy(self, now: float) -> bool:
        """One step; True while a sweep has more to do."""
        try:
            compared = now >= self.next_compare
            if compared:
                self.next_compare = now + COMPARE_INTERVAL_S
                self.unresolved = False
                self.compare_recent(now)
            if self.sweep is None and now >= self.next_full_sweep:
                self.schedule_sweep("scheduled")
            if self.sweep is not None and self.sweep_step():
                return True
            if compared and not self.unresolved and all(index.caught_up for index in self.indexes.values()):
                self.mark_verified(self.follow_started_ms)
        except redis.RedisError as exc:
            if not isinstance(exc, (redis.ConnectionError, redis.TimeoutError)) and not is_epoch_error(exc):
                raise                 # the local Redis: the loop reports it
            if is_epoch_error(exc):
                set_state(self.local, FAILOVER, describe_error(exc, self.config.primary_url))
            record_event(self.local, self.log, self.name, "repair_failed", level="warning",
                         reason=describe_error(exc, self.config.primary_url))
        return False

    def mark_verified(self, followed_ms: int) -> None:
        """Everything the local copy held at followed_ms has been compared with the primary (and
        re-sent where it lacked it): a watermark for /status, bin/sync-check and tests."""
        self.verified_ms = followed_ms
        self.local.hset(keys.SYNC_PRIMARY, "verified_ms", followed_ms)

    def compare_recent(self, now: float) -> None:
        for source in self.sources:
            recent = self.recent[source]
            for number in [n for n, seen in recent.items() if now - seen > RECENT_S]:
                del recent[number]
            self.repair(source, list(recent), "recent")

    def sweep_step(self) -> bool:
        sweep = self.sweep
        step, sweep["queue"] = (sweep["queue"][:SWEEP_SEGMENTS_PER_STEP],
                                sweep["queue"][SWEEP_SEGMENTS_PER_STEP:])
        for source in {source for source, _ in step}:
            sweep["checked"] += self.repair(source, [n for s, n in step if s == source], "sweep")
        if sweep["queue"]:
            return True
        self.finish_sweep()
        return False

    def finish_sweep(self) -> None:
        sweep, self.sweep = self.sweep, None
        for index in self.indexes.values():
            index.prune()
        self.next_full_sweep = time.monotonic() + FULL_SWEEP_EVERY_S
        self.counts["sweeps"] += 1
        seconds = round(time.monotonic() - sweep["started"], 3)
        if sweep["loss"]:
            self.local.hdel(keys.SYNC_PRIMARY, "sweep")
            self.counts["reseeded"] += sweep["added"]
            record_event(self.local, self.log, self.name, "reseed_done", level="warning",
                         reason=sweep["reason"], segments=sweep["checked"], trades_added=sweep["added"],
                         seconds=seconds)
        else:
            self.log.info("sweep_done", reason=sweep["reason"], segments=sweep["checked"],
                          trades_added=sweep["added"], seconds=seconds)

    def repair(self, source: str, numbers, detected_by: str) -> int:
        """Compare the segments with the primary and re-send what it lacks; returns the segments compared.
        Trades added while a sweep runs count for the sweep, whichever comparison found them."""
        if not numbers:
            return 0
        started = time.monotonic()
        difference = compare(self.local, self.replay_client, source, numbers)
        self.counts["compared_bytes"] += difference.bytes_compared
        if not difference.count:
            return difference.segments_compared
        try:
            done = resend(self.indexes[source], self.applier, difference)
        except redis.RedisError as exc:
            if not is_source_refusal(exc):
                raise
            self.refused(source, difference, exc)
            return difference.segments_compared
        if self.sweep is not None:
            self.sweep["added"] += done.applied
        self.counts["missing_found"] += difference.count
        self.counts["repaired"] += done.applied
        self.counts["not_held"] += done.not_held
        if done.applied or done.not_held:
            ids = difference.ids()
            record_event(self.local, self.log, self.name, "repair", level="warning", source=source,
                         detected_by=detected_by, missing=difference.count, trades_added=done.applied,
                         arrived_meanwhile=done.skipped, not_held=done.not_held, first=ids[0], last=ids[-1],
                         seconds=round(time.monotonic() - started, 3))
        return difference.segments_compared

    def refused(self, source: str, difference, exc: Exception) -> None:
        """The primary refuses this source's keys for now (a wrong type, its slot moving): keep its
        segments under watch, so the re-send is tried every second until it lands; the other sources
        are not held up, and nothing counts as verified meanwhile."""
        now = time.monotonic()
        for number in difference.missing:
            self.recent[source][number] = now
        self.unresolved = True
        if now - self.last_refusal_event.get(source, 0.0) >= REFUSAL_EVENT_EVERY_S:
            self.last_refusal_event[source] = now
            record_event(self.local, self.log, self.name, "repair_refused", level="error", source=source,
                         missing=difference.count, reason=describe_error(exc, self.config.primary_url))

    def stats(self) -> dict:
        drain = getattr(self, "drain", None)
        progress = {}
        if drain:
            elapsed = max(time.monotonic() - drain["started"], 1e-3)
            progress = {"drain_entries": drain["entries"], "drain_s": round(elapsed, 3),
                        "drain_entry_rate": round(drain["entries"] / elapsed, 1),
                        "drain_trade_rate": round(drain["trades"] / elapsed)}
        sweep = getattr(self, "sweep", None)
        if sweep:
            progress.update(sweep_reason=sweep["reason"], sweep_segments_left=len(sweep["queue"]),
                            sweep_added=sweep["added"])
        return {**getattr(self, "counts", {}), "streak": getattr(self, "streak", 0),
                "verified_ms": getattr(self, "verified_ms", 0),
                "draining": drain is not None, "drain_trades": drain["trades"] if drain else 0, **progress}


def main(argv=None) -> int:
    return run_process(Sync, argv)


if __name__ == "__main__":
    raise SystemExit(main())
