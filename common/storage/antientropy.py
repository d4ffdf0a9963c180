"""Anti-entropy: find the trades the local copy holds and the primary lacks, by mechanism, and re-send them.

The primary's seen-set says exactly which trades it holds (the apply script sets a trade's bit in the
same atomic step that appends it, so AOF, replication and a flush keep or lose both together). The
local side keeps the same bitmap layout for what its own copy holds, the *held index*, built by
following the local copy (the mirrored batches and the failover copy's stream). Comparing the two a
segment (2**16 ids, 8 KiB) at a time finds every trade the primary lost however it lost it — a
flush, a restart without its data, the tail of its AOF, a promoted replica that lagged, a replay cut
short — with no time window involved. Every missing trade is re-sent through the same idempotent
apply script, so a re-send of a trade that arrived meanwhile is a no-op.

Used by sync (continuously: recently touched segments every second, every segment on a schedule and
after the primary changed) and by bin/sync-check (on demand).
"""

import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

import orjson

from btcfeed import keys
from btcfeed.storage.apply import BatchApplier, trade_from_fields
from btcfeed.trade import decode_batch, encode_batch

SEGMENT_BITS = keys.SEEN_SEGMENT_BITS
SEGMENT_IDS = 1 << SEGMENT_BITS
SEGMENT_BYTES = SEGMENT_IDS // 8
MIRROR_READ = 64              # mirrored batches per read (up to 2,000 trades each)
TRADES_READ = 10_000          # failover-copy entries per read
RESEND_TRADES = 2_000         # trades per apply when re-sending

# Merge one follow step into the held index, safely beside another follower (sync and sync-check):
# bits are OR-ed in, a segment's first/last entry only widen, the cursor only moves forward.
# KEYS[1] where-hash  KEYS[2] cursor hash
# ARGV[1] held-segment key prefix  ARGV[2] scratch key  ARGV[3] cursor field  ARGV[4] new cursor
# ARGV[5..] per segment: number, stream letter, first entry id, last entry id, delta bitmap
MERGE_SCRIPT = """
local function before(a, b)
  local ams, aseq = string.match(a, '(%d+)-(%d+)')
  local bms, bseq = string.match(b, '(%d+)-(%d+)')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
for i = 5, #ARGV, 5 do
  local number, stream, first, last, delta = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local held = ARGV[1] .. number
  redis.call('SET', ARGV[2], delta)
  redis.call('BITOP', 'OR', held, held, ARGV[2])
  local where = redis.call('HGET', KEYS[1], stream .. number)
  if where then
    local old_first, old_last = string.match(where, '(%S+) (%S+)')
    if before(old_first, first) then first = old_first end
    if before(last, old_last) then last = old_last end
  end
  redis.call('HSET', KEYS[1], stream .. number, first .. ' ' .. last)
end
redis.call('DEL', ARGV[2])
local cursor = redis.call('HGET', KEYS[2], ARGV[3])
if not cursor or before(cursor, ARGV[4]) then redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) end
return 1
"""

# Stream letters in the where-hash: the mirrored batches and the failover copy's trade stream.
MIRROR, FAILOVER_COPY = "m", "t"


def set_bit(bitmap: bytearray, offset: int) -> None:
    """Redis bit order: offset 0 is the high bit of the first byte (as SETBIT and BITFIELD)."""
    bitmap[offset >> 3] |= 0x80 >> (offset & 7)


def ids_of(number: int, bitmap: bytes) -> List[int]:
    """The trade ids whose bits are set in a segment's bitmap."""
    base = number << SEGMENT_BITS
    found = []
    for index, byte in enumerate(bitmap):
        if byte:
            for bit in range(8):
                if byte & (0x80 >> bit):
                    found.append(base + index * 8 + bit)
    return found


def _padded(value: Optional[bytes]) -> int:
    return int.from_bytes((value or b"").ljust(SEGMENT_BYTES, b"\0"), "big")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _before(a: str, b: str) -> bool:
    """Stream entry id a is older than b."""
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms), int(a_seq or 0)) < (int(b_ms), int(b_seq or 0))


class HeldIndex:
    """What the local copy of one source holds, as seen-set bitmaps, and where to find each segment."""

    def __init__(self, local, source: str):
        self.local = local
        self.source = source
        self.merge = local.register_script(MERGE_SCRIPT)
        self.caught_up = True         # whether the last follow() reached the end of both streams

    def follow(self, confirmed: Optional[str], max_entries: int = 512) -> Set[int]:
        """Index what the local copy took in since the last call: mirror entries up to `confirmed` (the
        newest one whose batch the primary confirmed; later ones may still be on their way) and the
        failover copy's entries (local only). At most max_entries entries per stream; returns the
        segment numbers touched."""
        cursor = self.local.hgetall(keys.held_cursor(self.source))
        touched = set()
        self.caught_up = True
        for stream, letter, reader, last in ((keys.mirror(self.source), MIRROR, self._mirror_ids, confirmed),
                                             (keys.trades(self.source), FAILOVER_COPY, self._copy_ids, "+")):
            if not last:
                continue
            start = cursor.get(letter.encode())
            start = "(" + start.decode() if start else "-"
            count = max_entries if letter == MIRROR else max_entries * 20
            entries = self.local.xrange(stream, min=start, max=last, count=count)
            if entries:
                touched |= self._merge(letter, reader(entries), _text(entries[-1][0]))
            self.caught_up = self.caught_up and len(entries) < count
        return touched

    @staticmethod
    def _mirror_ids(entries) -> Iterator[Tuple[str, Iterable[int]]]:
        for entry_id, fields in entries:
            yield _text(entry_id), [row[0] for row in orjson.loads(zlib.decompress(fields[b"z"]))]

    @staticmethod
    def _copy_ids(entries) -> Iterator[Tuple[str, Iterable[int]]]:
        for entry_id, fields in entries:
            yield _text(entry_id), (int(fields[b"id"]),)

    def _merge(self, letter: str, entries, cursor: str) -> Set[int]:
        deltas: Dict[int, bytearray] = {}
        spans: Dict[int, List[str]] = {}
        for entry_id, ids in entries:
            for trade_id in ids:
                number = trade_id >> SEGMENT_BITS
                delta = deltas.get(number)
                if delta is None:
                    delta = deltas[number] = bytearray(SEGMENT_BYTES)
                    spans[number] = [entry_id, entry_id]
                set_bit(delta, trade_id & (SEGMENT_IDS - 1))
                spans[number][1] = entry_id
        args = [keys.held_prefix(self.source), keys.held_scratch(self.source), letter, cursor]
        for number, delta in deltas.items():
            args += [number, letter, spans[number][0], spans[number][1], bytes(delta)]
        self.merge(keys=[keys.held_where(self.source), keys.held_cursor(self.source)], args=args)
        return set(deltas)

    def prune(self) -> int:
        """Forget segments whose every entry has left the local copy (trimmed by retention or memory
        pressure): the local copy cannot re-send them any more, and the index stays bounded."""
        oldest = {}
        for stream, letter in ((keys.mirror(self.source), MIRROR), (keys.trades(self.source), FAILOVER_COPY)):
            first = self.local.xrange(stream, count=1)
            oldest[letter] = _text(first[0][0]) if first else None
        gone = []
        for field_name, value in self.local.hgetall(keys.held_where(self.source)).items():
            name = _text(field_name)
            last = _text(value).split()[1]
            if oldest[name[0]] is None or _before(last, oldest[name[0]]):
                gone.append(name)
        numbers = {int(name[1:]) for name in gone}
        remaining = {int(_text(f)[1:]) for f in self.local.hkeys(keys.held_where(self.source))
                     if _text(f) not in gone}
        pipe = self.local.pipeline(transaction=True)
        if gone:
            pipe.hdel(keys.held_where(self.source), *gone)
        for number in numbers - remaining:
            pipe.delete(keys.held_prefix(self.source) + str(number))
        pipe.execute()
        return len(numbers - remaining)

    def ends(self) -> Dict[str, Optional[str]]:
        """The newest entry of the mirror and of the failover copy now (None: empty)."""
        ends = {}
        for stream, letter in ((keys.mirror(self.source), MIRROR), (keys.trades(self.source), FAILOVER_COPY)):
            newest = self.local.xrevrange(stream, count=1)
            ends[letter] = _text(newest[0][0]) if newest else None
        return ends

    def has_taken_in(self, ends: Dict[str, Optional[str]]) -> bool:
        """Whether the index holds every entry up to these ends (from ends())."""
        cursor = self.local.hgetall(keys.held_cursor(self.source))
        for letter, end in ends.items():
            taken = cursor.get(letter.encode())
            if end is not None and (taken is None or _before(_text(taken), end)):
                return False
        return True

    def segments(self) -> List[int]:
        """Every segment the index knows, newest first."""
        fields = self.local.hkeys(keys.held_where(self.source))
        return sorted({int(_text(f)[1:]) for f in fields}, reverse=True)

    def where(self, number: int) -> Dict[str, Tuple[str, str]]:
        raw = self.local.hmget(keys.held_where(self.source), MIRROR + str(number),
                               FAILOVER_COPY + str(number))
        spans = {}
        for letter, value in zip((MIRROR, FAILOVER_COPY), raw):
            if value:
                first, last = _text(value).split()
                spans[letter] = (first, last)
        return spans

    def trades_of(self, number: int, wanted: Set[int]) -> list:
        """The trades of the wanted ids (all in segment `number`) that the local copy still holds."""
        spans = self.where(number)
        found = {}
        if MIRROR in spans:
            start, last = spans[MIRROR]
            while True:
                entries = self.local.xrange(keys.mirror(self.source), min=start, max=last, count=MIRROR_READ)
                for _, fields in entries:
                    for trade in decode_batch(zlib.decompress(fields[b"z"])):
                        if trade.id in wanted:
                            found[trade.id] = trade
                if len(entries) < MIRROR_READ:
                    break
                start = "(" + _text(entries[-1][0])
        if FAILOVER_COPY in spans and len(found) < len(wanted):
            start, last = spans[FAILOVER_COPY]
            while True:
                entries = self.local.xrange(keys.trades(self.source), min=start, max=last, count=TRADES_READ)
                for _, fields in entries:
                    if int(fields[b"id"]) in wanted:
                        trade = trade_from_fields(fields)
                        found[trade.id] = trade
                if len(entries) < TRADES_READ:
                    break
                start = "(" + _text(entries[-1][0])
        return list(found.values())


@dataclass
class Difference:
    """Per segment, the ids the local copy holds and the primary lacks (above the primary's floor)."""
    source: str
    missing: Dict[int, List[int]] = field(default_factory=dict)
    segments_compared: int = 0
    bytes_compared: int = 0

    @property
    def count(self) -> int:
        return sum(len(ids) for ids in self.missing.values())

    def ids(self) -> List[int]:
        return sorted(i for ids in self.missing.values() for i in ids)


def compare(local, primary, source: str, numbers: Iterable[int]) -> Difference:
    """Compare the held index with the primary's seen-set for the given segments."""
    numbers = sorted(set(numbers), reverse=True)
    result = Difference(source)
    if not numbers:
        return result
    local_pipe = local.pipeline(transaction=False)
    for number in numbers:
        local_pipe.get(keys.held_prefix(source) + str(number))
    held = local_pipe.execute()
    primary_pipe = primary.pipeline(transaction=False)
    primary_pipe.hget(keys.meta(source), "floor")
    for number in numbers:
        primary_pipe.get(keys.seen_prefix(source) + str(number))
    floor_raw, *seen = primary_pipe.execute()
    floor = int(floor_raw) if floor_raw else 0
    for number, mine, theirs in zip(numbers, held, seen):
        result.segments_compared += 1
        result.bytes_compared += len(mine or b"") + len(theirs or b"")
        lacking = _padded(mine) & ~_padded(theirs)
        if not lacking:
            continue
        ids = [i for i in ids_of(number, lacking.to_bytes(SEGMENT_BYTES, "big")) if i >= floor]
        if ids:
            result.missing[number] = ids
    return result


@dataclass
class Resent:
    applied: int = 0          # trades the primary lacked and now holds
    skipped: int = 0          # arrived meanwhile (a live write, another host): nothing done
    floored: int = 0          # below the primary's floor: older than its window
    not_held: int = 0         # no longer in the local copy (trimmed by retention)


def resend(index: HeldIndex, applier: BatchApplier, difference: Difference,
           oldest_first: bool = False) -> Resent:
    """Re-send every missing trade from the local copy through the idempotent apply, newest segment first
    (live history matters most after a loss), or oldest first (a copy into a new primary, whose
    stream then holds the window in trade order)."""
    done = Resent()
    for number in sorted(difference.missing, reverse=not oldest_first):
        wanted = set(difference.missing[number])
        trades = sorted(index.trades_of(number, wanted), key=lambda t: t.id)
        done.not_held += len(wanted) - len(trades)
        payloads = [(difference.source, encode_batch(trades[start:start + RESEND_TRADES]))
                    for start in range(0, len(trades), RESEND_TRADES)]
        # A segment's batches in one pipelined round trip (up to 33 of 2,000 trades).
        for applied, skipped, floored in (applier.apply_many(payloads) if payloads else ()):
            done.applied += applied
            done.skipped += skipped
            done.floored += floored
    return done
