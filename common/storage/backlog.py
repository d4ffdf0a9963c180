"""The backlog: batches kept in the local Redis while the primary is away, and how many trades it holds.

Every entry is one source's batch (fields src, n = its trades, z = the bus payload compressed, as the
mirror keeps it: a third to a half of the plain payload's bytes, and the backlog is what a long
outage fills the local Redis with; an entry from before holds t = the plain payload). Beside the
stream a counter holds the sum of n over the entries: the writer adds an entry and its count in
one transaction, sync removes replayed entries and their count in one script, so the bound in
trades is exact (DESIGN.md §2: bounded, the writer holds when it is reached, nothing dropped). When
the stream is empty the counter is reset, so it cannot drift past a hand-back.

In failover the writer coalesces the batches of one round by source (coalesce()): at real rates a
bus batch holds a few trades, and one entry (and one apply to the local copy) per source and round
instead of one per batch keeps the backlog's entries, and the work per trade, small.
"""

from typing import Iterable, List, Sequence, Tuple

import orjson

from btcfeed import keys
from btcfeed.storage.apply import batch_payload, compressed_batch

# Batch = (source, payload, trades)
Batch = Tuple[str, bytes, int]

# KEYS backlog, trade counter; ARGV entry id, its trades, entry id, its trades, ...
# An entry counts only if this call deleted it, so a repeat after a lost reply changes nothing.
DELETE_REPLAYED_SCRIPT = """
local gone = 0
for i = 1, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then gone = gone + tonumber(ARGV[i + 1]) end
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
elseif gone > 0 and redis.call('DECRBY', KEYS[2], gone) < 0 then
  redis.call('SET', KEYS[2], 0)
end
return gone
"""


def batch_trades(fields: dict) -> int:
    """The trades of a bus or backlog entry: its n field (every writer of either sets it), else counted."""
    count = fields.get(b"n")
    return int(count) if count is not None else len(orjson.loads(batch_payload(fields)))


def coalesce(batches: Iterable[Batch], max_trades: int) -> List[Batch]:
    """The batches of one round merged by source, in order, each at most max_trades trades (a bigger
    batch stays as it is). Payloads are the bus's compact JSON arrays, joined without decoding; one
    that is not an array is kept apart for the apply script to judge."""
    out: List[Batch] = []
    open_by_source = {}               # source -> index in out of the batch still taking more
    for source, payload, trades in batches:
        index = open_by_source.get(source)
        if not _is_array(payload):
            out.append((source, payload, trades))
            continue
        if index is not None and out[index][2] + trades <= max_trades:
            _, merged, held = out[index]
            out[index] = (source, _join(merged, payload), held + trades)
            continue
        open_by_source[source] = len(out)
        out.append((source, payload, trades))
    return out


def queue_append(pipe, source: str, payload: bytes, trades: int) -> None:
    """Queue one entry and its count on a transaction pipeline (the writer's failover commit)."""
    pipe.xadd(keys.BACKLOG, {"src": source, "n": trades, **compressed_batch(payload)})
    pipe.incrby(keys.BACKLOG_TRADES, trades)


def entry_batch(fields: dict) -> Tuple[str, bytes]:
    """(source, bus payload) of a backlog entry, as the apply script takes it."""
    return fields[b"src"].decode(), batch_payload(fields)


def delete_replayed(script, entries: Sequence) -> int:
    """Remove replayed (entry id, fields) from the backlog with their count; the trades removed."""
    args = []
    for entry_id, fields in entries:
        args += [entry_id, batch_trades(fields)]
    return script(keys=[keys.BACKLOG, keys.BACKLOG_TRADES], args=args)


def held_trades(client) -> int:
    return int(client.get(keys.BACKLOG_TRADES) or 0)


def _is_array(payload: bytes) -> bool:
    return payload[:1] == b"[" and payload[-1:] == b"]"


def _join(first: bytes, second: bytes) -> bytes:
    if len(first) == 2:               # "[]"
        return second
    if len(second) == 2:
        return first
    return first[:-1] + b"," + second[1:]
