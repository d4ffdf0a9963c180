"""writer: bus batches -> the primary Redis, one atomic idempotent apply per batch, ACK after."""

import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from common import keys
from common.apply import BatchApplier
from common.config import redact_url
from common.lifecycle import Process, run_process

CONSUMER = "writer"
READ_COUNT = 64                 # bus entries per read (each holds up to 2,000 trades)
READ_BLOCK_MS = 200             # well below supervisord's stopwaitsecs
RETRY_PAUSE_S = 0.5


def connect_primary(url: str, timeout_ms: int) -> redis.Redis:
    """Short timeouts so a dead or black-holed primary is noticed in well under a second.

    redis-py re-sends a command whose reply was lost; that is safe here because the only
    write this client sends is the apply script, which is idempotent.
    """
    timeout_s = timeout_ms / 1000
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1), health_check_interval=0)


class Writer(Process):
    name = "writer"

    def initialize(self) -> None:
        self.primary = connect_primary(self.config.primary_url, self.config.primary_timeout_ms)
        self.applier = BatchApplier(self.primary, self.config.retention_ms,
                                    self.config.compat_source.name if self.config.compat_source else None,
                                    self.config.compat_history_len)
        self._ensure_group()
        # Entries delivered before a crash and never ACKed come first; then new ones.
        self.read_from = "0"
        self.primary_ok = None
        self.counts = dict(applied=0, skipped=0, batches=0, errors=0, last_apply_ms=0)
        self.log.info("writer_ready", primary=redact_url(self.config.primary_url))

    def _ensure_group(self) -> None:
        try:
            self.local.xgroup_create(keys.BUS, keys.BUS_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def loop_once(self, now: float) -> None:
        try:
            entries = self._read()
        except redis.RedisError as exc:
            self.log.error("local_redis_unavailable", error=str(exc)[:200])
            self.stopping.wait(RETRY_PAUSE_S)
            self._reconnect_local()
            return
        if not entries:
            return
        while not self.stopping.is_set():
            try:
                self._apply(entries)
                break
            except redis.RedisError as exc:
                self._primary_failed(exc)
                self.stopping.wait(RETRY_PAUSE_S)
        else:
            return
        self._ack(entries)

    def _read(self):
        block = None if self.read_from == "0" else READ_BLOCK_MS
        reply = self.local.xreadgroup(keys.BUS_GROUP, CONSUMER, {keys.BUS: self.read_from},
                                      count=READ_COUNT, block=block)
        entries = reply[0][1] if reply else []
        if self.read_from == "0" and not entries:
            self.read_from = ">"
        return entries

    def _apply(self, entries) -> None:
        now_ms = int(time.time() * 1000)
        results = self.applier.apply_many([(fields[b"src"].decode(), fields[b"t"]) for _, fields in entries], now_ms)
        applied = sum(r[0] for r in results)
        self.counts["applied"] += applied
        self.counts["skipped"] += sum(r[1] for r in results)
        self.counts["batches"] += len(entries)
        self.counts["last_apply_ms"] = now_ms
        if self.primary_ok is not True:
            self.primary_ok = True
            self.log.info("primary_ok", primary=redact_url(self.config.primary_url))

    def _ack(self, entries) -> None:
        ids = [entry_id for entry_id, _ in entries]
        while not self.stopping.is_set():
            try:
                pipe = self.local.pipeline(transaction=False)
                pipe.xack(keys.BUS, keys.BUS_GROUP, *ids)
                # Everything up to the newest ACKed entry is done (one consumer, in order): trim it.
                pipe.xtrim(keys.BUS, minid=_next_id(ids[-1]), approximate=True)
                pipe.execute()
                return
            except redis.RedisError as exc:
                # Unacked entries are delivered again later and re-applied harmlessly.
                self.log.error("ack_failed", error=str(exc)[:200])
                self.stopping.wait(RETRY_PAUSE_S)
                self._reconnect_local()
                return

    def _reconnect_local(self) -> None:
        self.read_from = "0"
        try:
            self._ensure_group()
        except redis.RedisError:
            pass

    def _primary_failed(self, exc: Exception) -> None:
        self.counts["errors"] += 1
        if self.primary_ok is not False:
            self.primary_ok = False
            self.log.error("primary_unavailable", primary=redact_url(self.config.primary_url),
                           error=f"{type(exc).__name__}: {str(exc)[:200]}")

    def stats(self) -> dict:
        return {**getattr(self, "counts", {}), "primary_ok": getattr(self, "primary_ok", None)}


def _next_id(entry_id: bytes) -> str:
    ms, _, seq = entry_id.decode().partition("-")
    return f"{ms}-{int(seq) + 1}"


def main(argv=None) -> int:
    return run_process(Writer, argv)


if __name__ == "__main__":
    raise SystemExit(main())
