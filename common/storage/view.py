"""The read view: each source's trades in id order and without a hole, built from the local copy.

The local Redis holds a source's trades in two streams, in the order they were applied, with
duplicates between them: the mirror (one entry per batch applied to the healthy primary) and the
failover copy (one entry per trade written while the primary was away). ViewBuilder tails both and
keeps keys.view(source): one entry per run of consecutive trade ids, in the bus payload format
(trade.encode_batch), with the entry id '<first trade id>-0' ('0-1' for a run that starts at id 0).
So a trade id finds its entry with XREVRANGE view <id> - COUNT 1, and readers never see a hole.

How it decides (per source, in memory):
  next      the lowest trade id the view does not hold yet;
  buffer    trades read with ids above next, by id (a trade read twice is kept once; ids below
            next are dropped: the same trade can be in the mirror and the failover copy, or sent again).
Every run that starts at next is appended. When trades above a missing next wait in the buffer:
  - next lies inside one of ingest's gap records: the backfill will fill it; wait;
  - otherwise next is on the bus but not applied yet, or was given up. The gap records and the bus's
    newest entry are read in one transaction; once the writer's group has delivered and ACKed past
    that entry (everything on the bus up to it is in the mirror or the failover copy), both streams
    are read to their ends again, and if next is still missing it was given up: the view skips to
    the lowest buffered id and says so (event view_ids_skipped). A mechanism, not a time window.

Every append is one script with the view_state hash: next, and the mirror / failover-copy positions
of the last moment the buffer was empty. A restarted builder (SIGKILL at any moment) reads again from
there: whatever it reads twice is below next and dropped; nothing it had buffered is lost.

The writer appends too, in the script that mirrors and ACKs a batch (APPEND_TO_VIEW_LUA): a batch of
consecutive ids that starts at next, while view_state's mirror position is the mirror's newest entry
(the builder has taken in everything mirrored before it), goes into the view as its own entry and
moves next and the mirror position past it. At a real rate that is every batch, and the builder, which
waits on a wake token the writer pushes only for the batches it did not append, does not run at all.
The two never append the same trade: each append checks next first (the builder's is a
compare-and-set; when it fails the builder reads view_state again, as after a restart).

Memory stays bounded: reads are chunked, and a buffer above MAX_BUFFERED stops taking trades above
its highest id; once the buffer empties the builder reads again from the saved positions.
"""

import time
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

import orjson
import redis

from btcfeed import keys
from btcfeed.events import record_event
from btcfeed.storage.apply import batch_payload, compressed_batch
from btcfeed.storage.bus import BUS_BATCH_MAX
from btcfeed.trade import Trade, decode_batch, encode_batch

MIRROR_COUNT = 32               # mirror entries per read (each a batch of up to a few thousand trades)
COPY_COUNT = 4000               # failover-copy entries per read (one trade each)
# Trades per view entry the builder writes: a reader decodes one entry to find an id. The writer's
# own entries are whole bus batches (up to BUS_BATCH_MAX): only a flat-out rate makes them longer.
RUN_MAX = 500
MAX_BUFFERED = 1_000_000        # trades held above a missing id before the builder stops taking more
STUCK_CHECK_EVERY_S = 0.2       # how often a missing id is looked into
TRIM_EVERY_S = 10.0
START = "0-0"


# The writer's append, a Lua function for its mirror-and-ACK script (see the module's docstring).
# tip: the mirror's newest entry before this batch (false when unknown); entry: this batch's mirror
# entry; first, after: the batch's first id and the id after its last ('' when its ids are not one
# run of consecutive ids); view_id, name, payload: the view entry (the mirror's own).
APPEND_TO_VIEW_LUA = """
local function append_to_view(view, state, wake, tip, entry, first, after, view_id, name, payload)
  if first ~= '' and tip then
    local held = redis.call('HMGET', state, 'next', 'm')
    if held[1] == first and held[2] == tip then
      redis.call('XADD', view, view_id, name, payload)
      redis.call('HSET', state, 'next', after, 'm', entry)
      return
    end
  end
  redis.call('LPUSH', wake, '1')
  redis.call('LTRIM', wake, 0, 0)
end
"""

# The builder's append: only while view_state still holds the next it appended from (the writer may
# have moved it meanwhile). KEYS view, view_state; ARGV expected next ('' for none yet), new next,
# mirror position, copy position, then (entry id, field, value) per view entry. Returns 1, or 0 when
# next has moved.
COMMIT_LUA = """
if (redis.call('HGET', KEYS[2], 'next') or '') ~= ARGV[1] then return 0 end
for at = 5, #ARGV, 3 do
  redis.call('XADD', KEYS[1], ARGV[at], ARGV[at + 1], ARGV[at + 2])
end
redis.call('HSET', KEYS[2], 'next', ARGV[2], 'm', ARGV[3], 't', ARGV[4])
return 1
"""


def writer_view_part(payload: bytes) -> Tuple[str, str, str]:
    """For APPEND_TO_VIEW_LUA: (first id, id after the last, view entry id) of a bus batch whose ids
    are one run of consecutive ids, else ('', '', '')."""
    if payload.count(b"[") - 1 > BUS_BATCH_MAX:
        return "", "", ""
    ids = [row[0] for row in orjson.loads(payload)]
    if not ids or ids != list(range(ids[0], ids[0] + len(ids))):
        return "", "", ""
    return str(ids[0]), str(ids[-1] + 1), entry_id_for(ids[0])


def wake_builder(pipe, source: str) -> None:
    """Queue the builder's wake token (for a write to the failover copy)."""
    pipe.lpush(keys.view_wake(source), 1)
    pipe.ltrim(keys.view_wake(source), 0, 0)


def entry_id_for(first_id: int) -> str:
    return f"{first_id}-0" if first_id > 0 else "0-1"


def first_id_of(entry_id) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.partition("-")[0])


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_tuple(entry_id) -> Tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


class ViewBuilder:
    """Keeps one source's view in the local Redis; step() does one round of reading and appending."""

    def __init__(self, client: redis.Redis, source: str, log, process: str = "api"):
        self.client = client
        self.source = source
        self.log = log
        self.process = process
        self.view_key = keys.view(source)
        self.state_key = keys.view_state(source)
        self.mirror_key = keys.mirror(source)
        self.copy_key = keys.trades(source)
        self.wake_key = keys.view_wake(source)
        self.commit_script = client.register_script(COMMIT_LUA)
        self.counts = dict(appended=0, skipped=0, skip_events=0, rereads=0)
        self._last_trim = 0.0
        self.load()

    # --- state ------------------------------------------------------------------------------------
    def load(self) -> None:
        """Take next and the read positions from view_state (after a start, or after an error)."""
        state = {_text(k): _text(v) for k, v in self.client.hgetall(self.state_key).items()}
        self.buffer: Dict[int, Trade] = {}
        self.cap: Optional[int] = None             # with a full buffer: ids at or above it are not taken
        self.wait_target: Optional[str] = None     # the bus entry the writer must pass (a missing id)
        self.wait_next: Optional[int] = None
        self.waiting_on_gap = False
        self._last_stuck_check = 0.0
        if "next" in state:
            self.next = int(state["next"])
            self.saved = (state.get("m", START), state.get("t", START))
        else:
            self.next = None
            self.saved = (START, START)
        self.stored_next = self.next             # what view_state holds (the writer may move it)
        self.mirror_pos, self.copy_pos = self.saved

    def initialize(self) -> None:
        """A view built for the first time starts at the lowest trade id the local copy holds (one
        chunked scan); a view without its state is dropped and built again."""
        if self.next is not None:
            return
        lowest = None
        for trades in self._scan(self.mirror_key, self.copy_key):
            low = min(trade.id for trade in trades)
            lowest = low if lowest is None else min(lowest, low)
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.view_key)
        if lowest is not None:
            self.next = lowest
            pipe.hset(self.state_key, mapping={"next": lowest, "m": START, "t": START})
        pipe.execute()
        self.stored_next = self.next

    def _scan(self, *streams) -> Iterator[List[Trade]]:
        for stream in streams:
            start = "-"
            while True:
                count = MIRROR_COUNT if stream == self.mirror_key else COPY_COUNT
                entries = self.client.xrange(stream, min=start, max="+", count=count)
                if not entries:
                    break
                yield self._decode(stream, entries)
                start = "(" + _text(entries[-1][0])

    # --- one round ----------------------------------------------------------------------------------
    def step(self, block_ms: int = 200) -> int:
        """Wait for the writer's wake token (up to block_ms), read what is new, append what can be
        appended; the trades appended."""
        if self.next is None:
            self.initialize()
        full = self._wait_and_read(block_ms)
        appended = self._append_runs()
        if self.buffer and not full:
            appended += self._look_into_missing()
        if not appended:
            self._save_positions()
        self._rewind_after_overflow()
        self._trim()
        return appended

    def _wait_and_read(self, block_ms: Optional[int]) -> bool:
        """The wait, view_state's next and the read, in one round trip. When next has moved (the
        writer appended meanwhile), go on from view_state as after a restart."""
        pipe = self.client.pipeline(transaction=False)
        if block_ms:
            pipe.blpop([self.wake_key], timeout=block_ms / 1000)
        pipe.hget(self.state_key, "next")
        pipe.xread({self.mirror_key: self.mirror_pos, self.copy_key: self.copy_pos}, count=MIRROR_COUNT)
        *_, stored_next, reply = pipe.execute()
        if (None if stored_next is None else int(stored_next)) != self.stored_next:
            self.load()
            if self.next is None:
                return False        # view_state is gone: the next step builds the view again
            return self._read()
        return self._take_reply(reply)

    def _read(self) -> bool:
        """Read what is new in both streams; True when a read returned a full chunk (more is waiting)."""
        streams = {self.mirror_key: self.mirror_pos, self.copy_key: self.copy_pos}
        return self._take_reply(self.client.xread(streams, count=MIRROR_COUNT))

    def _take_reply(self, reply) -> bool:
        """At a real rate a batch comes at a time, so one XREAD of both streams is all a round reads;
        only a full reply (a backlog, a failover copy at a high rate) is followed by reads of each
        stream with its own COUNT."""
        more = False
        for stream, entries in reply or []:
            more |= self._take(_text(stream), entries, MIRROR_COUNT)
        if not more:
            return False
        full = False
        for count, stream in ((MIRROR_COUNT, self.mirror_key), (COPY_COUNT, self.copy_key)):
            position = self.mirror_pos if stream == self.mirror_key else self.copy_pos
            reply = self.client.xread({stream: position}, count=count)
            if reply:
                full |= self._take(stream, reply[0][1], count)
        return full

    def _take(self, stream: str, entries, count: int) -> bool:
        if not entries:
            return False
        trades = self._decode(stream, entries)
        if self.next is None:
            self.next = min(trade.id for trade in trades)
        low, cap, buffer = self.next, self.cap, self.buffer
        for trade in trades:
            trade_id = trade.id
            if trade_id >= low and (cap is None or trade_id < cap):
                buffer[trade_id] = trade
        last = _text(entries[-1][0])
        if stream == self.mirror_key:
            self.mirror_pos = last
        else:
            self.copy_pos = last
        if len(buffer) > MAX_BUFFERED:
            self._shed()
        return len(entries) >= count

    def _decode(self, stream: str, entries) -> List[Trade]:
        trades = []
        if stream == self.mirror_key:
            for _, fields in entries:
                if b"z" in fields:
                    trades.extend(decode_batch(zlib.decompress(fields[b"z"])))
        else:
            for _, f in entries:
                try:
                    trades.append(Trade(int(f[b"id"]), f[b"p"].decode(), f[b"q"].decode(),
                                        f[b"side"].decode(), int(f[b"ts"]), int(f[b"rts"])))
                except (KeyError, ValueError):
                    continue
        return trades

    def _shed(self) -> None:
        """Keep the lowest MAX_BUFFERED // 2 ids; ids above are read again once the buffer empties."""
        kept = sorted(self.buffer)[:MAX_BUFFERED // 2]
        self.cap = kept[-1] + 1
        self.buffer = {trade_id: self.buffer[trade_id] for trade_id in kept}

    def _rewind_after_overflow(self) -> None:
        if self.cap is not None and not self.buffer:
            self.cap = None
            self.mirror_pos, self.copy_pos = self.saved
            self.counts["rereads"] += 1

    # --- appending ------------------------------------------------------------------------------------
    def _append_runs(self) -> int:
        buffer, start = self.buffer, self.next
        if start is None or start not in buffer:
            return 0
        run = []
        trade_id = start
        while trade_id in buffer:
            run.append(buffer.pop(trade_id))
            trade_id += 1
        return len(run) if self._commit(run, trade_id) else 0

    def _commit(self, run: List[Trade], next_id: int) -> bool:
        """Append the run (RUN_MAX trades per entry) and the new state in one script; False when
        the writer moved next meanwhile (the builder then went on from view_state)."""
        if not self.buffer and self.cap is None:
            self.saved = (self.mirror_pos, self.copy_pos)
        entries = []
        for offset in range(0, len(run), RUN_MAX):
            part = run[offset:offset + RUN_MAX]
            (name, value), = compressed_batch(encode_batch(part)).items()
            entries += [entry_id_for(part[0].id), name, value]
        if not self._compare_and_set(next_id, entries):
            return False
        self.next = next_id
        self.counts["appended"] += len(run)
        self.wait_target = None
        self.waiting_on_gap = False
        return True

    def _skip_to(self, lowest: int) -> None:
        skipped_from = self.next
        if not self._compare_and_set(lowest, []):
            return
        self.next = lowest
        self.counts["skipped"] += lowest - skipped_from
        self.counts["skip_events"] += 1
        record_event(self.client, self.log, self.process, "view_ids_skipped", level="warning",
                     source=self.source, first=skipped_from, last=lowest - 1, count=lowest - skipped_from)

    def _save_positions(self) -> None:
        """What was read held nothing to append (trades already in the view, e.g. a batch the writer
        mirrored twice after a lost reply): with nothing buffered, store how far it read, so the
        writer, which appends only while the builder is level with the mirror, appends again."""
        if self.next is None or self.buffer or self.cap is not None:
            return
        if (self.mirror_pos, self.copy_pos) != self.saved:
            self.saved = (self.mirror_pos, self.copy_pos)
            self._compare_and_set(self.next, [])

    def _compare_and_set(self, next_id: int, entries: list) -> bool:
        """Append the view entries and store next_id with the saved positions, unless next has moved
        since this builder read it (the writer appended): then go on from view_state (False)."""
        expected = "" if self.stored_next is None else self.stored_next
        if self.commit_script(keys=[self.view_key, self.state_key],
                              args=[expected, next_id, self.saved[0], self.saved[1], *entries]):
            self.stored_next = next_id
            return True
        self.load()
        return False

    # --- a missing id ---------------------------------------------------------------------------------
    def _look_into_missing(self) -> int:
        now = time.monotonic()
        if now - self._last_stuck_check < STUCK_CHECK_EVERY_S:
            return 0
        self._last_stuck_check = now
        if self.wait_next != self.next:
            self.wait_target, self.wait_next = None, self.next
        if self.wait_target is None:
            gaps, bus_last = self._gaps_and_bus_end()
            self.waiting_on_gap = in_gap(self.next, gaps)
            if self.waiting_on_gap:
                return 0
            self.wait_target = bus_last
        if not self._writer_passed(self.wait_target):
            return 0
        # Everything on the bus up to the target is in the mirror or the failover copy: read to the ends.
        appended = 0
        while self._read():
            appended += self._append_runs()
        appended += self._append_runs()
        if self.buffer and self.next == self.wait_next:
            self._skip_to(min(self.buffer))
            appended += self._append_runs()
        self.wait_target = None
        return appended

    def _gaps_and_bus_end(self):
        pipe = self.client.pipeline(transaction=True)
        pipe.hgetall(keys.gaps(self.source))
        pipe.xrevrange(keys.BUS, "+", "-", count=1)
        gaps, last = pipe.execute()
        gaps = {_text(k): _text(v) for k, v in gaps.items()}
        return gaps, _text(last[0][0]) if last else START

    def _writer_passed(self, target: str) -> bool:
        """Whether the writer's group has delivered every bus entry up to target and ACKed them."""
        if target == START:
            return True
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.xinfo_groups(keys.BUS)
            pipe.xpending(keys.BUS, keys.BUS_GROUP)
            groups, pending = pipe.execute()
        except redis.ResponseError:
            return False
        group = next((g for g in groups if _text(g["name"]) == keys.BUS_GROUP), None)
        if group is None or _id_tuple(group["last-delivered-id"]) < _id_tuple(target):
            return False
        return not pending["pending"] or _id_tuple(pending["min"]) > _id_tuple(target)

    # --- bounds -------------------------------------------------------------------------------------
    def _trim(self) -> None:
        """The view never reaches below the lowest trade the local copy still holds (as its oldest
        entries say: each stream is in apply order)."""
        now = time.monotonic()
        if now - self._last_trim < TRIM_EVERY_S:
            return
        self._last_trim = now
        lows = []
        for stream in (self.mirror_key, self.copy_key):
            first = self.client.xrange(stream, count=1)
            if first:
                trades = self._decode(stream, first)
                if trades:
                    lows.append(min(trade.id for trade in trades))
        if lows:
            self.client.xtrim(self.view_key, minid=entry_id_for(min(lows)), approximate=False)

    def stats(self) -> dict:
        return {"next": self.next, "held_back": len(self.buffer), "waiting_on_gap": self.waiting_on_gap,
                **self.counts}


def in_gap(trade_id: int, gaps: dict) -> bool:
    """Whether a gap record (or the open catch-up) covers trade_id."""
    for field, record in gaps.items():
        try:
            if field == "open":
                if trade_id >= int(record):
                    return True
            elif int(field) <= trade_id <= int(record.partition(":")[0]):
                return True
        except ValueError:
            continue
    return False


# --- reading the view ---------------------------------------------------------------------------------

def entry_rows(fields) -> list:
    """A view entry's trades as rows [id, p, q, side, ts, rts, units]: compressed like the mirror
    (most of the local Redis's memory is trades), or plain in a view built before that."""
    return orjson.loads(batch_payload(fields))


def entry_trades(fields) -> List[Trade]:
    return [Trade(*row[:6]) for row in entry_rows(fields)]


def view_ends(client: redis.Redis, source: str) -> Optional[Tuple[Trade, Trade]]:
    """(oldest trade, newest trade) of the view; None while it is empty."""
    pipe = client.pipeline(transaction=False)
    pipe.xrange(keys.view(source), count=1)
    pipe.xrevrange(keys.view(source), count=1)
    first, last = pipe.execute()
    if not first or not last:
        return None
    return entry_trades(first[0][1])[0], entry_trades(last[0][1])[-1]


def start_entry(client: redis.Redis, source: str, after_id: int) -> Optional[str]:
    """The id of the view entry that holds the trade after after_id, or after which it will come; None
    when the view does not reach that far back (the entry would be below its oldest)."""
    found = client.xrevrange(keys.view(source), max=entry_id_for(after_id + 1), min="-", count=1)
    if not found:
        return None
    return _text(found[0][0])


def trades_after(client: redis.Redis, source: str, after_id: int, limit: int) -> List[Trade]:
    """Up to limit trades with ids above after_id, in id order, gap-free (assumes after_id + 1 is at or
    above the view's oldest trade, else the first trades returned start at its oldest)."""
    start = start_entry(client, source, after_id) or "-"
    out: List[Trade] = []
    while len(out) < limit:
        entries = client.xrange(keys.view(source), min=start, max="+", count=max(2, limit // RUN_MAX + 2))
        if not entries:
            break
        for _, fields in entries:
            for trade in entry_trades(fields):
                if trade.id > after_id:
                    out.append(trade)
        start = "(" + _text(entries[-1][0])
    return out[:limit]


def trade_json(trade: Trade) -> bytes:
    return orjson.dumps({"id": trade.id, "p": trade.p, "q": trade.q, "side": trade.side,
                         "ts": trade.ts, "rts": trade.rts})


def trade_at(client: redis.Redis, source: str, trade_id: int) -> Optional[Trade]:
    """The trade with this id, if the view holds it."""
    found = client.xrevrange(keys.view(source), max=entry_id_for(trade_id), min="-", count=1)
    if not found:
        return None
    trades = entry_trades(found[0][1])
    offset = trade_id - trades[0].id
    return trades[offset] if 0 <= offset < len(trades) else None


def first_id_from_time(client: redis.Redis, source: str, ts: int, oldest: Trade,
                       newest: Trade) -> Optional[int]:
    """The lowest trade id whose exchange time is ts or later (exchange times never go back as ids
    go up within one source); None when every trade in the view is older."""
    if newest.ts < ts:
        return None
    low, high = oldest.id, newest.id         # the answer lies in [low, high]
    while low < high:
        middle = (low + high) // 2
        found = trade_at(client, source, middle)
        if found is None or found.ts >= ts:
            high = middle
        else:
            low = middle + 1
    return low


def sse_events(rows, after_id: int) -> Tuple[str, int, int]:
    """Decoded bus rows ([id, p, q, side, ts, rts, units]) as Server-Sent Events, those above after_id:
    (text, events, last id)."""
    parts = [SSE_EVENT % (row[0], row[0], row[1], row[2], row[3], row[4], row[5])
             for row in rows if row[0] > after_id]
    return "".join(parts), len(parts), rows[-1][0] if rows else after_id


SSE_EVENT = 'id: %d\ndata: {"id":%d,"p":"%s","q":"%s","side":"%s","ts":%d,"rts":%d}\n\n'
