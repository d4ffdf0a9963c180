"""The local bus: batches of trades from ingest to writer, with each source's cursor beside them."""

import json
import time

import redis

from common import keys
from common.trade import encode_batch

# XADD of a batch and the cursor move are one script, so a local Redis that loses its last
# second of AOF rolls both back together and the cursor never claims a trade the bus lost.
# A call whose reply was lost can be sent again safely: a batch at or below the cursor is a no-op.
PUBLISH_SCRIPT = """
local cursor = tonumber(redis.call('GET', KEYS[2]) or '-1')
if tonumber(ARGV[4]) <= cursor then return 0 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'src', ARGV[2], 'n', ARGV[3], 't', ARGV[5])
redis.call('SET', KEYS[2], ARGV[4])
return 1
"""
PUBLISHED, ALREADY_DURABLE, BUS_FULL = 1, 0, -1
RAW_KEEP_BYTES = 4096


def connect_local(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client for the local Redis; the bus is on the same host, so timeouts can be generous."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=0)


def wait_for_local(client: redis.Redis, wait_s: float) -> None:
    """Raise the last connection error if the local Redis does not answer within wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.ping()
            return
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class Bus:
    def __init__(self, client: redis.Redis, max_entries: int, deadletter_max: int):
        self.client = client
        self.max_entries = max_entries
        self.deadletter_max = deadletter_max
        self._publish = client.register_script(PUBLISH_SCRIPT)

    def publish(self, source: str, trades) -> int:
        """Append one batch (ids ascending, all above the cursor); PUBLISHED, ALREADY_DURABLE or BUS_FULL."""
        return self._publish(keys=[keys.BUS, keys.cursor(source)],
                             args=[self.max_entries, source, len(trades), trades[-1].id, encode_batch(trades)])

    def cursor(self, source: str):
        value = self.client.get(keys.cursor(source))
        return int(value) if value is not None else None

    def dead_letter(self, source: str, reason: str, raw) -> None:
        """Keep a rejected message (bounded) with its reason, and count it for the source."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "replace")
        pipe = self.client.pipeline(transaction=False)
        pipe.xadd(keys.DEADLETTER, {"src": source, "reason": reason, "raw": raw[:RAW_KEEP_BYTES],
                                    "size": len(raw), "ts": int(time.time() * 1000)},
                  maxlen=self.deadletter_max, approximate=True)
        pipe.hincrby(keys.source_stats(source), "deadlettered", 1)
        pipe.execute()


def write_heartbeat(client: redis.Redis, process: str, stats: dict, ttl_s: int = 10) -> None:
    """A heartbeat that expires by itself, so a dead process disappears from the status."""
    client.set(keys.heartbeat(process), json.dumps({"ts": int(time.time() * 1000), **stats}), ex=ttl_s)


def read_heartbeats(client: redis.Redis, processes) -> dict:
    values = client.mget([keys.heartbeat(p) for p in processes])
    return {p: (json.loads(v) if v else None) for p, v in zip(processes, values)}
