"""The local bus: batches of trades from ingest to writer, with each source's cursor beside them."""

import json
import threading
import time
from typing import NamedTuple, Optional

import redis

from btcfeed import keys
from btcfeed.storage.dedicated import DedicatedConnection
from btcfeed.trade import encode_batch

BUS_BATCH_MAX = 2000            # trades per bus entry (ingest's batches, the writer's view entries)

# The durable state of a source on the local bus, kept by these scripts only:
#   cursor   the highest trade id whose place is settled: every id up to it is on the bus, or
#            inside one of the source's gap records;
#   gaps     hash: first missing id -> "last missing id:exchange time (ms) of the trade before"
#            (the time, '' when unknown, is where a REST search by time starts), plus the field
#            "open" -> the first id after the cursor when newer trades may exist that no
#            connection delivered (after a reconnect or a restart: the catch-up is open-ended);
#   stats    hash field cursor_ts: the exchange time of the cursor's trade; field id_space: which id
#            sequence the cursor and gaps count in (Binance trade ids and aggregate ids differ).
# Each script changes the bus and these together, so a local Redis that loses its last second of
# AOF rolls all of it back together and no id is ever claimed without a trade or a gap record.
# Every script can be sent again after a lost reply: a repeat is a no-op.

# A live batch (ids contiguous and ascending). Ids between the cursor and the batch become a gap
# (the reply is then 2).
# KEYS bus, cursor, gaps, stats; ARGV max entries, source, n, first id, last id, payload, last ts
PUBLISH_SCRIPT = """
local cursor = tonumber(redis.call('GET', KEYS[2]) or '-1')
local first, last = tonumber(ARGV[4]), tonumber(ARGV[5])
if last <= cursor then return 0 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
local result = 1
if cursor >= 0 and first > cursor + 1 then
  -- The missing ids are known now: the open catch-up (if any) becomes this bounded gap.
  local before = redis.call('HGET', KEYS[4], 'cursor_ts') or ''
  redis.call('HSET', KEYS[3], string.format('%d', cursor + 1),
             string.format('%d', first - 1) .. ':' .. before)
  redis.call('HDEL', KEYS[3], 'open')
  result = 2
elseif redis.call('HEXISTS', KEYS[3], 'open') == 1 then
  -- Still contiguous: the catch-up goes on from after this batch.
  redis.call('HSET', KEYS[3], 'open', string.format('%d', last + 1))
end
redis.call('XADD', KEYS[1], '*', 'src', ARGV[2], 'n', ARGV[3], 't', ARGV[6])
redis.call('SET', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[4], 'cursor_ts', ARGV[7])
return result
"""

# The exchange names a trade newer than the cursor that no connection delivered (a heartbeat's
# last id, the id sampled from a message cut by a dropped connection): everything up to it is a gap.
# KEYS cursor, gaps, stats; ARGV newest id
NOTE_GAP_SCRIPT = """
local cursor = tonumber(redis.call('GET', KEYS[1]) or '-1')
local newest = tonumber(ARGV[1])
if cursor < 0 or newest <= cursor then return 0 end
local before = redis.call('HGET', KEYS[3], 'cursor_ts') or ''
redis.call('HDEL', KEYS[2], 'open')
redis.call('HSET', KEYS[2], string.format('%d', cursor + 1), ARGV[1] .. ':' .. before)
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], 'cursor_ts')
return 1
"""

# After a (re)connect or a restart: trades after the cursor may have been missed, how many unknown.
# KEYS cursor, gaps
OPEN_GAP_SCRIPT = """
local cursor = tonumber(redis.call('GET', KEYS[1]) or '-1')
if cursor < 0 or redis.call('HEXISTS', KEYS[2], 'open') == 1 then return 0 end
redis.call('HSET', KEYS[2], 'open', string.format('%d', cursor + 1))
return 1
"""

# A batch fetched over REST for a gap: it must start at the gap's first id (pages are contiguous);
# the gap shrinks to what is still missing. For the open catch-up the cursor moves with it.
# KEYS bus, cursor, gaps, stats; ARGV max entries, source, n, first id, last id, payload, last ts, gap
BACKFILL_SCRIPT = """
local first, last, gap = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[8]
local record = redis.call('HGET', KEYS[3], gap)
if not record then return 0 end
if gap == 'open' then
  if tonumber(record) ~= first then return 0 end
elseif tonumber(gap) ~= first then
  return 0
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('XADD', KEYS[1], '*', 'src', ARGV[2], 'n', ARGV[3], 't', ARGV[6])
if gap == 'open' then
  redis.call('HSET', KEYS[3], 'open', string.format('%d', last + 1))
  local cursor = tonumber(redis.call('GET', KEYS[2]) or '-1')
  if last > cursor then
    redis.call('SET', KEYS[2], ARGV[5])
    redis.call('HSET', KEYS[4], 'cursor_ts', ARGV[7])
  end
else
  local upto = tonumber(string.match(record, '^(%d+)'))
  redis.call('HDEL', KEYS[3], gap)
  if last < upto then
    redis.call('HSET', KEYS[3], string.format('%d', last + 1), string.format('%d', upto) .. ':' .. ARGV[7])
  end
end
return 1
"""

# A gap (or part of one) the exchange cannot fill: give it up so the backfill moves on.
# KEYS gaps; ARGV gap field, expected record, first id still wanted ('' = drop the whole record)
GIVE_UP_SCRIPT = """
local record = redis.call('HGET', KEYS[1], ARGV[1])
if record ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  if ARGV[1] == 'open' then
    redis.call('HSET', KEYS[1], 'open', ARGV[3])
  else
    local upto = string.match(record, '^(%d+)')
    if tonumber(ARGV[3]) <= tonumber(upto) then
      redis.call('HSET', KEYS[1], ARGV[3], upto .. ':')
    end
  end
end
return 1
"""
# At start: the cursor and gap records count ids of one sequence (Binance `trade` or `aggTrade`).
# When the configured kind differs from the recorded one they mean nothing for it: drop them, so
# the new kind starts from the live stream like a first start. State written before the id space
# was recorded is taken to be of the configured kind. Returns {} or {old kind, old cursor, gaps}.
# KEYS cursor, gaps, stats; ARGV id space
CLAIM_ID_SPACE_SCRIPT = """
local recorded = redis.call('HGET', KEYS[3], 'id_space')
if recorded == ARGV[1] then return {} end
redis.call('HSET', KEYS[3], 'id_space', ARGV[1])
if not recorded then return {} end
local cursor = redis.call('GET', KEYS[1]) or ''
local gaps = redis.call('HLEN', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[3], 'cursor_ts')
return {recorded, cursor, gaps}
"""
PUBLISHED, PUBLISHED_AFTER_GAP, ALREADY_DURABLE, BUS_FULL = 1, 2, 0, -1
RAW_KEEP_BYTES = 4096


def connect_local(url: str, timeout_s: float = 5.0, name: str = None) -> redis.Redis:
    """A client for the local Redis; the bus is on the same host, so timeouts can be generous. name
    (CLIENT SETNAME) says whose connections they are in CLIENT LIST (a process finds its own to
    unblock them when it stops)."""
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                health_check_interval=0, client_name=name)


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


class Gap(NamedTuple):
    """One gap record: ids first..last are missing (last None: the open catch-up, unbounded);
    before is the exchange time (ms) of the trade before first, when known; record is the stored
    value, which a give-up must match."""
    field: str
    first: int
    last: Optional[int]
    before: Optional[int]
    record: str

    @classmethod
    def parse(cls, field: str, record: str) -> "Gap":
        if field == "open":
            return cls(field, int(record), None, None, record)
        last, _, before = record.partition(":")
        return cls(field, int(field), int(last), int(before) if before else None, record)


class Bus:
    def __init__(self, client: redis.Redis, max_entries: int, deadletter_max: int):
        self.client = client
        self.max_entries = max_entries
        self.deadletter_max = deadletter_max
        self._publish = client.register_script(PUBLISH_SCRIPT)
        # Each feed thread publishes its live batches on a connection of its own (storage/dedicated.py).
        self._per_thread = threading.local()
        self._note_gap = client.register_script(NOTE_GAP_SCRIPT)
        self._open_gap = client.register_script(OPEN_GAP_SCRIPT)
        self._backfill = client.register_script(BACKFILL_SCRIPT)
        self._give_up = client.register_script(GIVE_UP_SCRIPT)
        self._claim_id_space = client.register_script(CLAIM_ID_SPACE_SCRIPT)

    @staticmethod
    def _keys(source: str) -> list:
        """The keys of the publish and backfill scripts."""
        return [keys.BUS, keys.cursor(source), keys.gaps(source), keys.source_stats(source)]

    def publish(self, source: str, trades) -> int:
        """Append one live batch (ids contiguous, ascending); ids skipped since the cursor become a
        gap. PUBLISHED, ALREADY_DURABLE or BUS_FULL."""
        return self._round_trips().run_script(
            self._publish, self._keys(source),
            [self.max_entries, source, len(trades), trades[0].id, trades[-1].id, encode_batch(trades),
             trades[-1].ts])

    def _round_trips(self) -> DedicatedConnection:
        connection = getattr(self._per_thread, "connection", None)
        if connection is None:
            connection = self._per_thread.connection = DedicatedConnection(self.client)
        return connection

    def publish_backfill(self, source: str, gap: str, trades) -> int:
        """Append a batch fetched for the gap recorded at `gap` (its first id, or "open"); the gap
        shrinks by it. PUBLISHED, ALREADY_DURABLE (the gap moved on meanwhile) or BUS_FULL."""
        return self._backfill(keys=self._keys(source),
                              args=[self.max_entries, source, len(trades), trades[0].id, trades[-1].id,
                                    encode_batch(trades), trades[-1].ts, gap])

    def note_gap(self, source: str, newest_id: int) -> bool:
        """The exchange has trades up to newest_id that no connection delivered: record the gap."""
        return bool(self._note_gap(keys=[keys.cursor(source), keys.gaps(source), keys.source_stats(source)],
                                   args=[newest_id]))

    def open_gap(self, source: str) -> bool:
        """After a (re)connect or a restart: catch up on whatever came after the cursor."""
        return bool(self._open_gap(keys=[keys.cursor(source), keys.gaps(source)]))

    def give_up_gap(self, source: str, gap: str, record: str, keep_from: int = None) -> bool:
        """Stop asking for ids the exchange does not have: drop the record at `gap` (as read), or
        keep only its part from keep_from on."""
        return bool(self._give_up(keys=[keys.gaps(source)],
                                  args=[gap, record, "" if keep_from is None else keep_from]))

    def claim_id_space(self, source: str, id_space: str) -> dict:
        """Make the source's cursor and gaps count in id_space. {} when they already did (or there
        were none); else what was dropped: {"old": kind, "cursor": id or None, "gaps": records}."""
        reply = self._claim_id_space(keys=[keys.cursor(source), keys.gaps(source), keys.source_stats(source)],
                                     args=[id_space])
        if not reply:
            return {}
        old, cursor, gaps = reply
        return {"old": old.decode(), "cursor": int(cursor) if cursor else None, "gaps": int(gaps)}

    def gaps(self, source: str) -> dict:
        """The source's gap records by field (a first missing id, or "open")."""
        return {field.decode(): Gap.parse(field.decode(), value.decode())
                for field, value in self.client.hgetall(keys.gaps(source)).items()}

    def cursor_time(self, source: str):
        value = self.client.hget(keys.source_stats(source), "cursor_ts")
        return int(value) if value is not None and value.isdigit() else None

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
