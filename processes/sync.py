"""sync: watches the primary, replays the backlog when it is healthy again, hands the writer back,
and re-seeds a primary that came back empty or lost data from the local copy."""

import time
from concurrent.futures import ThreadPoolExecutor

import redis

from common import keys
from common.apply import BatchApplier, read_local_copy
from common.config import redact_url
from common.events import record_event
from common.lifecycle import Process, run_process
from common.trade import encode_batch
from common.primary import cluster_probe, connect_primary, is_cluster
from processes.writer import DRAINING, FAILOVER, PRIMARY, describe_error, read_state, set_state

WATCH_INTERVAL_S = 1.0          # identity check of a healthy primary
REPLAY_ENTRIES = 16             # backlog entries per pipelined round trip (up to 32,000 trades)
REPLAY_TIMEOUT_MS = 5000        # replays send big pipelines; the probe keeps the short timeout
RESEED_CHUNK = 2000
# A primary restarted with its data may have lost the writes of its last fsync window (1 s with
# appendfsync everysec, up to ~30 s with "no"); re-send what the local copy got since this long
# before the primary was last seen healthy.
RESEED_MARGIN_MS = 60_000
SETTLED_AFTER_MS = 3_000     # well beyond a batch in flight to the primary (its timeout is 0.5 s)

# Hand back only if the backlog is empty and nobody changed the state meanwhile: from here on the
# writer's WATCHed backlog transaction fails and it writes to the primary instead.
HAND_BACK_SCRIPT = """
if redis.call('XLEN', KEYS[1]) == 0 and redis.call('HGET', KEYS[2], 'state') == 'draining' then
  redis.call('HSET', KEYS[2], 'state', 'primary', 'since', ARGV[1], 'reason', 'backlog replayed')
  return 1
end
return 0
"""


class PrimaryUnhealthy(Exception):
    """The probe's reason, in one line."""


class Sync(Process):
    name = "sync"

    def initialize(self) -> None:
        cfg = self.config
        compat = cfg.compat_source.name if cfg.compat_source else None
        self.cluster = is_cluster(cfg)
        self.probe_client = connect_primary(cfg, cfg.primary_timeout_ms)
        self.replay_client = connect_primary(cfg, max(cfg.primary_timeout_ms, REPLAY_TIMEOUT_MS))
        self.applier = BatchApplier(self.replay_client, cfg.retention_ms, compat, cfg.compat_history_len)
        self.hand_back_script = self.local.register_script(HAND_BACK_SCRIPT)
        self.replay_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="replay")
        self.streak = 0
        self.last_unhealthy_reason = None
        self.next_watch = 0.0
        self.drain = None
        self.counts = dict(replayed=0, reseeded=0, hand_backs=0, drains=0, replay_rate=0.0)

    def loop_once(self, now: float) -> None:
        state = read_state(self.local)
        if state == PRIMARY:
            self.drain = None
            self.watch_primary(now)
            self.stopping.wait(0.2)
        elif state == FAILOVER:
            self.drain = None
            self.await_recovery()
            self.stopping.wait(self.config.probe_interval_ms / 1000)
        elif state == DRAINING:
            self.drain_step()

    # --- probing -------------------------------------------------------------------------------
    def probe(self) -> dict:
        """One health check: answers, is a master, accepts a write. Returns the server's identity."""
        if self.cluster:
            try:
                return cluster_probe(self.probe_client, [source.name for source in self.config.sources])
            except redis.RedisError as exc:
                raise PrimaryUnhealthy(describe_error(exc, self.config.primary_url))
        pipe = self.probe_client.pipeline(transaction=False)
        pipe.info("server")
        pipe.info("replication")
        pipe.set(keys.PROBE, int(time.time() * 1000), px=10_000)
        try:
            server, replication, _ = pipe.execute()
        except redis.RedisError as exc:
            raise PrimaryUnhealthy(describe_error(exc, self.config.primary_url))
        if replication.get("role") != "master":
            raise PrimaryUnhealthy(f"primary is a replica (role {replication.get('role')}), not writable")
        return {"run_id": server.get("run_id")}

    def reseed_plan(self, identity: dict):
        """Whether and from when the primary must be re-seeded: (reason, since_ms); ('', None) if not.

        since_ms None means the whole local copy (the primary lost btcfeed's keys: it came back
        empty or was wiped). A restart that kept its data can only have lost its last writes
        (the AOF's fsync window): re-sending what was written since shortly before it was last
        seen healthy is enough, and far cheaper than the whole retention window.
        """
        known = self.local.hgetall(keys.SYNC_PRIMARY)
        for source in self.config.sources:
            if self.settled_local_copy(source.name) and not self.probe_client.exists(keys.last(source.name)):
                return f"primary lost the keys of {source.name}", None
        if known.get(b"reseed") == b"1":
            since = known.get(b"reseed_since")
            return known.get(b"reseed_reason", b"re-seed pending").decode(), int(since) if since else None
        run_id = known.get(b"run_id")
        if run_id and identity["run_id"] and run_id.decode() != identity["run_id"]:
            seen = known.get(b"seen_ms")
            return "primary restarted (new run_id)", int(seen) - RESEED_MARGIN_MS if seen else None
        return "", None

    def settled_local_copy(self, source: str) -> bool:
        """Whether the local copy holds trades written a while ago. The writer mirrors a batch while
        the primary applies it, so a brand-new local copy may run a moment ahead of the primary."""
        horizon = int(time.time() * 1000) - SETTLED_AFTER_MS
        for stream in (keys.mirror(source), keys.trades(source)):
            oldest = self.local.xrange(stream, count=1)
            if oldest and int(oldest[0][0].decode().partition("-")[0]) < horizon:
                return True
        return False

    def remember(self, identity: dict) -> None:
        self.local.hset(keys.SYNC_PRIMARY, mapping={"run_id": identity["run_id"] or "",
                                                    "seen_ms": int(time.time() * 1000)})

    def watch_primary(self, now: float) -> None:
        """While the writer uses the primary: notice a restart or data loss it cannot see itself."""
        if now < self.next_watch:
            return
        self.next_watch = now + WATCH_INTERVAL_S
        try:
            identity = self.probe()
            reason, since_ms = self.reseed_plan(identity)
        except (PrimaryUnhealthy, redis.RedisError):
            return          # the writer fails over on its next write
        if reason:
            self.local.hset(keys.SYNC_PRIMARY, mapping={"reseed": "1", "reseed_reason": reason,
                                                        "reseed_since": since_ms if since_ms is not None else ""})
            set_state(self.local, FAILOVER, reason)
            record_event(self.local, self.log, self.name, "primary_changed", level="error", reason=reason,
                         primary=redact_url(self.config.primary_url))
        else:
            self.remember(identity)

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
        reason, since_ms = self.reseed_plan(identity)
        if reason:
            # Remember the plan first: a re-seed cut short (an error, a SIGKILL) writes the keys
            # whose absence revealed the loss, so only this record makes the next try finish it.
            self.local.hset(keys.SYNC_PRIMARY, mapping={"reseed": "1", "reseed_reason": reason,
                                                        "reseed_since": since_ms if since_ms is not None else ""})
            if not self.reseed(reason, since_ms):
                return
        self.remember(identity)
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
        batches = [(fields[b"src"].decode(), fields[b"t"]) for _, fields in entries]
        # The primary applies these while the next entries are read from the local Redis.
        applying = self.replay_pool.submit(self.applier.apply_many, batches, int(time.time() * 1000))
        try:
            following = self.local.xrange(keys.BACKLOG, min="(" + entries[-1][0].decode(), count=REPLAY_ENTRIES)
        finally:
            try:
                results = applying.result()
            except redis.RedisError as exc:
                results = None
                set_state(self.local, FAILOVER, f"replay failed: {describe_error(exc, self.config.primary_url)}")
                record_event(self.local, self.log, self.name, "drain_failed", level="error",
                             reason=describe_error(exc, self.config.primary_url), replayed=self.drain["trades"])
                self.drain = None
        if results is None:
            return
        # Replayed entries leave the backlog only after the primary confirmed them; a crash in
        # between replays them again, which the seen-set turns into a no-op.
        self.local.xdel(keys.BACKLOG, *[entry_id for entry_id, _ in entries])
        self.drain["next"] = following
        replayed = sum(applied + skipped for applied, skipped in results)
        self.drain["trades"] += replayed
        self.drain["entries"] += len(entries)
        self.counts["replayed"] += replayed

    def hand_back(self) -> None:
        if not self.hand_back_script(keys=[keys.BACKLOG, keys.WRITER_STATE], args=[int(time.time() * 1000)]):
            return
        seconds = time.monotonic() - self.drain["started"]
        rate = self.drain["trades"] / seconds if seconds > 0 else 0.0
        self.counts["hand_backs"] += 1
        self.counts["replay_rate"] = round(rate)
        record_event(self.local, self.log, self.name, "hand_back", replayed_trades=self.drain["trades"],
                     replayed_entries=self.drain["entries"], drain_s=round(seconds, 3), replay_rate=round(rate))
        self.drain = None

    def reseed(self, reason: str, since_ms=None) -> bool:
        """Apply the local copy (all of it, or what was written since since_ms) to the primary again;
        the seen-set lets only what the primary lacks be added."""
        scope = "whole local copy" if since_ms is None else f"written since {since_ms}"
        record_event(self.local, self.log, self.name, "reseed_start", level="warning", reason=reason, scope=scope)
        started, added, sent = time.monotonic(), 0, 0
        start = "-" if since_ms is None else f"{max(0, since_ms)}-0"
        try:
            for source in self.config.sources:
                for chunk in read_local_copy(self.local, source.name, RESEED_CHUNK, start=start):
                    if self.stopping.is_set():
                        return False
                    applied, skipped = self.applier.apply_many(
                        [(source.name, encode_batch(chunk))], int(time.time() * 1000))[0]
                    added += applied
                    sent += applied + skipped
        except redis.RedisError as exc:
            record_event(self.local, self.log, self.name, "reseed_failed", level="error",
                         reason=describe_error(exc, self.config.primary_url), added=added)
            return False
        self.local.hdel(keys.SYNC_PRIMARY, "reseed", "reseed_reason", "reseed_since")
        self.counts["reseeded"] += added
        record_event(self.local, self.log, self.name, "reseed_done", level="warning", reason=reason, scope=scope,
                     trades_checked=sent, trades_added=added, seconds=round(time.monotonic() - started, 3))
        return True

    def stats(self) -> dict:
        drain = getattr(self, "drain", None)
        progress = {}
        if drain:
            elapsed = max(time.monotonic() - drain["started"], 1e-3)
            progress = {"drain_entries": drain["entries"], "drain_s": round(elapsed, 3),
                        "drain_entry_rate": round(drain["entries"] / elapsed, 1),
                        "drain_trade_rate": round(drain["trades"] / elapsed)}
        return {**getattr(self, "counts", {}), "streak": getattr(self, "streak", 0),
                "draining": drain is not None, "drain_trades": drain["trades"] if drain else 0, **progress}


def main(argv=None) -> int:
    return run_process(Sync, argv)


if __name__ == "__main__":
    raise SystemExit(main())
