"""`btcfeed sync-check` (bin/sync-check): does the primary hold every trade the local copy holds?
Report it; re-send what it lacks.

Two checks per source:

seen-set comparison, the one sync runs continuously (common/storage/antientropy.py): the held index (the local
copy's trade ids as seen-set bitmaps) is brought up to date, with the mirror followed up to the entry the
primary confirmed and the failover copy, and compared with the primary's seen-set over every segment it
knows. It gives the "missing from the primary" figure and ranges, with no time window; --repair re-sends
exactly those trades through the idempotent apply script, under the primary's epoch.

stream audit, what no bitmap comparison can see, read from both trade streams for the trades received
inside the retention window (less a grace for each side's own trimming, up to a settle time):
  - ids that occur more than once in the primary's stream (anywhere in it);
  - entries gone from the primary's stream although its seen-set marks them applied: a re-send cannot
    bring them back, since the apply script skips a trade marked applied (that keeps each trade once);
  - trades per minute (by the trade's own ts), counted from both streams: a candle can agree with its
    twin while the stream behind it lost or doubled entries;
  - the last hashes (the highest id each side has seen).

Exit codes follow the Nagios convention of bin/health: 0 OK, 1 WARNING, 2 CRITICAL (a configuration error
too, as from every btcfeed command), 3 UNKNOWN (a usage error too).
"""

import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import redis

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.storage.antientropy import Difference, HeldIndex, compare, resend
from btcfeed.storage.apply import BatchApplier, read_mirror_since
from btcfeed.storage.bus import connect_local
from btcfeed.config import redact_url, scrub, secrets_of, url_secrets
from btcfeed.storage.epochs import known_epochs
from btcfeed.events import record_event
from btcfeed.lifecycle import EventLog
from btcfeed.storage.primary import connect_primary
from btcfeed.storage.writerstate import PRIMARY, describe_error

PROCESS = "sync-check"
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}

# Trades received this recently may still be on their way (bus -> primary -> local mirror).
SETTLE_MS = 5_000
# Each server trims its stream by entry time (MINID ~) on its own schedule and clock, so the oldest
# part of the retention window may already be gone from one side only: start the audit later.
TRIM_GRACE_MS = 10 * 60_000
SCAN_CHUNK = 10_000
# Reading 10,000 entries, or sending a repair pipeline, can take longer than the writer's sub-second
# timeout; the first ping keeps the short one so that a dead primary is still reported quickly.
SCAN_TIMEOUT_MS = 5_000
LOCAL_TIMEOUT_S = 5.0
FOLLOW_ENTRIES = 512          # mirrored batches taken into the held index per step, as sync does
COMPARE_SEGMENTS = 64         # segments per comparison round trip: 512 KiB from each side at most
RANGES_SHOWN = 10
RANGES_IN_JSON = 1_000
MINUTES_IN_JSON = 100
DUPLICATES_LISTED = 10
NO_EPOCH = ("not repairing {source}: the local side knows no epoch of the primary for it (sync records "
            "one once it has verified the primary), and a re-send without one could fill a primary that "
            "lost btcfeed's data; run sync, then this check again")
LOST_MARKED_NOTE = ("not repairing {source}: {count} entries lost although marked applied cannot be "
                    "restored by re-sending (the apply script skips a trade its seen-set marks applied, "
                    "which is what keeps each trade exactly once)")

# --- a compact set of trade ids ------------------------------------------------------------------
SEGMENT_BITS = 16
SEGMENT_BYTES = (1 << SEGMENT_BITS) // 8
SEGMENT_MASK = (1 << SEGMENT_BITS) - 1


class IdSet:
    """Trade ids as bitmap segments of 2**16 ids: about one bit per trade, as exchange ids are consecutive."""

    def __init__(self):
        self.segments: Dict[int, bytearray] = {}

    @classmethod
    def of(cls, ids: Iterable[int]) -> "IdSet":
        result = cls()
        for trade_id in ids:
            result.add(trade_id)
        return result

    def add(self, trade_id: int) -> bool:
        """Add an id; False if it was there already."""
        number = trade_id >> SEGMENT_BITS
        segment = self.segments.get(number)
        if segment is None:
            segment = self.segments[number] = bytearray(SEGMENT_BYTES)
        offset = trade_id & SEGMENT_MASK
        byte, bit = offset >> 3, 1 << (offset & 7)
        if segment[byte] & bit:
            return False
        segment[byte] |= bit
        return True

    def __contains__(self, trade_id: int) -> bool:
        segment = self.segments.get(trade_id >> SEGMENT_BITS)
        offset = trade_id & SEGMENT_MASK
        return segment is not None and bool(segment[offset >> 3] & (1 << (offset & 7)))

    def __iter__(self) -> Iterator[int]:
        for first, last in self.ranges():
            yield from range(first, last + 1)

    def __len__(self) -> int:
        return sum(int.from_bytes(segment, "little").bit_count() for segment in self.segments.values())

    def difference(self, other: "IdSet") -> "IdSet":
        result = IdSet()
        for number, segment in self.segments.items():
            theirs = other.segments.get(number)
            bits = int.from_bytes(segment, "little")
            if theirs is not None:
                bits &= ~int.from_bytes(theirs, "little")
            if bits:
                result.segments[number] = bytearray(bits.to_bytes(SEGMENT_BYTES, "little"))
        return result

    def ranges(self) -> Iterator[Tuple[int, int]]:
        """The ids as ascending (first, last) runs of consecutive ids."""
        start = end = None
        for number in sorted(self.segments):
            base = number << SEGMENT_BITS
            for index, byte in enumerate(self.segments[number]):
                if not byte:
                    continue
                first = base + index * 8
                if byte == 0xFF and end == first - 1:
                    end = first + 7
                    continue
                for bit in range(8):
                    if byte >> bit & 1:
                        trade_id = first + bit
                        if end is not None and trade_id == end + 1:
                            end = trade_id
                        else:
                            if end is not None:
                                yield start, end
                            start = end = trade_id
        if end is not None:
            yield start, end


def format_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


@dataclass
class IdRanges:
    """A set of ids as reported: how many, the first RANGES_IN_JSON runs, and how many runs in all."""
    count: int = 0
    ranges: List[Tuple[int, int]] = field(default_factory=list)
    total: int = 0

    @classmethod
    def of(cls, ids: IdSet) -> "IdRanges":
        result = cls(len(ids))
        for number, run in enumerate(ids.ranges()):
            if number < RANGES_IN_JSON:
                result.ranges.append(run)
            result.total = number + 1
        return result

    def shown(self) -> str:
        text = ", ".join(format_range(*run) for run in self.ranges[:RANGES_SHOWN])
        more = self.total - min(self.total, RANGES_SHOWN)
        return text + (f" and {more} more ranges" if more else "")

    def in_ranges(self) -> str:
        return f"in {self.total} range{'s' if self.total != 1 else ''}"


# --- the check ----------------------------------------------------------------------------------
class LocalFailure(Exception):
    """The local Redis failed: nothing can be said about the primary (UNKNOWN)."""


class PrimaryFailure(Exception):
    """The primary failed to answer (CRITICAL)."""


class MalformedEntry(ValueError):
    """A trade stream entry without readable id, ts or rts fields."""


@dataclass(frozen=True)
class Window:
    """The stream audit's window (the seen-set comparison has none)."""
    now_ms: int
    from_ms: int      # trades received at or after this are audited ...
    settle_ms: int    # ... up to this; newer ones may still be in flight

    @classmethod
    def ending(cls, now_ms: int, retention_ms: int) -> "Window":
        grace = min(TRIM_GRACE_MS, retention_ms // 10)
        return cls(now_ms, now_ms - retention_ms + grace, now_ms - SETTLE_MS)


@dataclass
class SourceResult:
    source: str
    # seen-set comparison
    segments_compared: int = 0
    missing: IdRanges = field(default_factory=IdRanges)
    index: Optional[HeldIndex] = field(default=None, repr=False)            # what --repair re-sends from
    difference: Optional[Difference] = field(default=None, repr=False)      # ... and what it re-sends
    # stream audit
    local_trades: int = 0
    primary_trades: int = 0
    absent_in_window: int = 0        # audited ids of the local copy that the primary's stream lacks
    lost_marked: IdRanges = field(default_factory=IdRanges)
    settling_missing: int = 0
    only_in_primary: int = 0
    duplicated: int = 0
    duplicated_ids: List[int] = field(default_factory=list)
    minutes: Dict[int, List[int]] = field(default_factory=dict)   # minute start ms -> [local, primary]
    local_last: Optional[dict] = None
    primary_last: Optional[dict] = None

    def differing_minutes(self) -> List[int]:
        return sorted(m for m, (local, primary) in self.minutes.items() if local != primary)


@dataclass
class Check:
    status: int
    reasons: List[Tuple[int, str]]
    writer: dict
    window: Optional[Window]
    sources: List[SourceResult]
    elapsed_s: float
    primary_url: str
    local_url: str
    verified_ms: Optional[int] = None       # sync's watermark: all the local copy held then was compared


def blame(local, exc: Exception, what: str) -> Exception:
    """The failure for a Redis error of a step that talks to both sides: the local Redis's if it no
    longer answers (UNKNOWN: nothing can be said), otherwise the primary's (CRITICAL)."""
    try:
        local.ping()
    except redis.RedisError:
        return LocalFailure(f"{what}: {describe_error(exc)}")
    return PrimaryFailure(f"{what}: {describe_error(exc)}")


def follow_local_copy(local, source: str) -> HeldIndex:
    """Bring the held index up to date: every mirror entry up to the one the primary confirmed (later
    ones may still be on their way to it) and the whole failover copy. Safe beside sync's own follower:
    the merge ORs bits in and only moves the shared cursor forward, whoever takes an entry in first."""
    index = HeldIndex(local, source)
    try:
        confirmed = local.hget(keys.MIRROR_CONFIRMED, source)
        while True:
            index.follow(_text(confirmed) if confirmed else None, FOLLOW_ENTRIES)
            if index.caught_up:
                return index
    except redis.exceptions.OutOfMemoryError:
        # describe_error's hint would name the primary; this is the local Redis, which the writer relieves.
        raise LocalFailure(f"following the local copy of {source}: the local Redis is at its memory limit "
                           "(the writer trims the mirror to make room); run the check again")
    except (redis.RedisError, zlib.error, ValueError, KeyError) as exc:
        raise LocalFailure(f"following the local copy of {source}: {_reason(exc)}")


def compare_with_seen_set(local, primary, result: SourceResult) -> None:
    """sync's comparison, over every segment the held index knows: the trades missing from the primary."""
    index = follow_local_copy(local, result.source)
    try:
        numbers = index.segments()
    except redis.RedisError as exc:
        raise LocalFailure(f"reading the held index of {result.source}: {describe_error(exc)}")
    difference = Difference(result.source)
    for start in range(0, len(numbers), COMPARE_SEGMENTS):
        try:
            part = compare(local, primary, result.source, numbers[start:start + COMPARE_SEGMENTS])
        except redis.RedisError as exc:
            raise blame(local, exc, f"comparing {result.source} with the primary's seen-set")
        difference.missing.update(part.missing)
        difference.segments_compared += part.segments_compared
        difference.bytes_compared += part.bytes_compared
    result.index, result.difference = index, difference
    result.segments_compared = difference.segments_compared
    result.missing = IdRanges.of(IdSet.of(difference.ids()))


def scan_stream(client, source: str) -> Iterator[Tuple[int, int, int]]:
    """(id, ts, rts) of every entry of a source's trade stream, in stream order, chunk by chunk."""
    stream = keys.trades(source)
    start = "-"
    while True:
        entries = client.xrange(stream, min=start, max="+", count=SCAN_CHUNK)
        if not entries:
            return
        for entry_id, fields in entries:
            try:
                yield int(fields[b"id"]), int(fields[b"ts"]), int(fields[b"rts"])
            except (KeyError, ValueError):
                raise MalformedEntry(f"entry {_text(entry_id)} of {stream} has no readable id/ts/rts")
        start = "(" + _text(entries[-1][0])


def scan_local_copy(local, source: str) -> Iterator[Tuple[int, int, int]]:
    """(id, ts, rts) of every trade the local Redis holds: mirrored batches, then the failover copy."""
    for _, trades in read_mirror_since(local, source):
        for trade in trades:
            yield trade.id, trade.ts, trade.rts
    yield from scan_stream(local, source)


def read_last(client, source: str) -> Optional[dict]:
    raw = client.hmget(keys.last(source), "id", "rts")
    if raw[0] is None:
        return None
    return {"id": int(raw[0]), "rts": int(raw[1]) if raw[1] is not None else 0}


def read_writer(local) -> dict:
    try:
        raw = local.hgetall(keys.WRITER_STATE)
    except redis.RedisError as exc:
        raise LocalFailure(describe_error(exc))
    record = {_text(k): _text(v) for k, v in raw.items()}
    return {"state": record.get("state") or PRIMARY, "since": record.get("since"),
            "reason": record.get("reason")}


def read_verified(local) -> Optional[int]:
    """sync's verified_ms watermark, if sync has set one."""
    try:
        raw = local.hget(keys.SYNC_PRIMARY, "verified_ms")
    except redis.RedisError as exc:
        raise LocalFailure(describe_error(exc))
    return int(raw) if raw else None


def scan_local(local, result: SourceResult, window: Window) -> Tuple[IdSet, IdSet]:
    """The local copy's ids inside the window, and those still settling; counts per minute."""
    compared, settling = IdSet(), IdSet()
    try:
        result.local_last = read_last(local, result.source)
        for trade_id, ts, rts in scan_local_copy(local, result.source):
            if result.local_last is None or trade_id > result.local_last["id"]:
                result.local_last = {"id": trade_id, "rts": rts}
            if rts < window.from_ms:
                continue
            if rts >= window.settle_ms:
                settling.add(trade_id)
            elif compared.add(trade_id):
                result.local_trades += 1
                result.minutes.setdefault(ts // 60000 * 60000, [0, 0])[0] += 1
    except (redis.RedisError, MalformedEntry) as exc:
        raise LocalFailure(f"reading the local copy of {result.source}: {_reason(exc)}")
    return compared, settling


def scan_primary(primary, result: SourceResult, window: Window, local_ids: IdSet) -> IdSet:
    """Every id in the primary's stream (duplicates counted over all of it); minute counts in the window."""
    present = IdSet()
    try:
        result.primary_last = read_last(primary, result.source)
        for trade_id, ts, rts in scan_stream(primary, result.source):
            first_time = present.add(trade_id)
            if not first_time:
                result.duplicated += 1
                if len(result.duplicated_ids) < DUPLICATES_LISTED:
                    result.duplicated_ids.append(trade_id)
            if window.from_ms <= rts < window.settle_ms:
                result.primary_trades += 1
                result.minutes.setdefault(ts // 60000 * 60000, [0, 0])[1] += 1
                if first_time and trade_id not in local_ids:
                    result.only_in_primary += 1
    except (redis.RedisError, MalformedEntry) as exc:
        raise PrimaryFailure(f"reading the primary's {result.source}: {_reason(exc)}")
    return present


def marked_applied(primary, source: str, ids: IdSet) -> IdSet:
    """Those of the ids whose bit the primary's seen-set has set, at or above its floor (below it every
    id counts as seen: those trades left the primary's window, their entries were trimmed by design)."""
    marked = IdSet()
    numbers = sorted(ids.segments)
    if not numbers:
        return marked
    pipe = primary.pipeline(transaction=False)
    pipe.hget(keys.meta(source), "floor")
    for number in numbers:
        pipe.get(keys.seen_prefix(source) + str(number))
    try:
        floor_raw, *seen = pipe.execute()
    except redis.RedisError as exc:
        raise PrimaryFailure(f"reading the primary's seen-set of {source}: {describe_error(exc)}")
    floor = int(floor_raw) if floor_raw else 0
    bitmaps = dict(zip(numbers, seen))
    for trade_id in ids:
        bitmap = bitmaps[trade_id >> SEGMENT_BITS] or b""
        offset = trade_id & SEGMENT_MASK
        # Redis bit order (SETBIT, BITFIELD): offset 0 is the high bit of the first byte.
        if trade_id >= floor and offset >> 3 < len(bitmap) and bitmap[offset >> 3] & (0x80 >> (offset & 7)):
            marked.add(trade_id)
    return marked


def audit_streams(local, primary, result: SourceResult, window: Window) -> None:
    """The stream audit. The local copy is read before the primary: in primary state the writer applies
    to the primary before it mirrors locally, so a trade seen locally is already there."""
    compared, settling = scan_local(local, result, window)
    present = scan_primary(primary, result, window, compared)
    absent = compared.difference(present)
    result.absent_in_window = len(absent)
    result.lost_marked = IdRanges.of(marked_applied(primary, result.source, absent))
    result.settling_missing = len(settling.difference(present))


def run_check(cfg, local, probe, primary) -> Check:
    """Both checks of every source, with the writer's state read before and after."""
    started = time.monotonic()
    window = Window.ending(int(time.time() * 1000), cfg.retention_ms)
    writer_before = read_writer(local)
    verified_ms = read_verified(local)

    def finish(reasons, sources, writer=writer_before) -> Check:
        status = max((level for level, _ in reasons), default=OK)
        return Check(status, reasons, writer, window, sources, time.monotonic() - started,
                     redact_url(cfg.primary_url), redact_url(cfg.local_url), verified_ms)

    try:
        probe.ping()
    except redis.RedisError as exc:
        reason = scrub_secrets(describe_error(exc), cfg.primary_url)
        return finish([(CRITICAL, f"primary unreachable: {reason}")], [])
    results = []
    try:
        for source in cfg.sources:
            result = SourceResult(source.name)
            compare_with_seen_set(local, primary, result)
            audit_streams(local, primary, result, window)
            results.append(result)
    except PrimaryFailure as exc:
        reason = scrub_secrets(str(exc), cfg.primary_url)
        return finish([(CRITICAL, f"primary failed during the check: {reason}")], [])
    writer_after = read_writer(local)
    return finish(assess(results, writer_before, writer_after, window), results, writer_after)


def assess(results: List[SourceResult], writer_before: dict, writer_after: dict, window: Window) -> list:
    """(level, reason) pairs; no pair means the primary holds everything the local copy holds."""
    reasons = writer_reasons(writer_before, writer_after)
    changed = writer_changed(writer_before, writer_after)
    # In failover and draining the primary is behind by design: the backlog holds the difference.
    behind_expected = writer_after["state"] != PRIMARY or writer_before["state"] != PRIMARY or changed
    behind_level = WARNING if behind_expected else CRITICAL
    for r in results:
        reasons += comparison_reasons(r, behind_level)
        reasons += audit_reasons(r, behind_level, window)
    return reasons


def writer_changed(before: dict, after: dict) -> bool:
    return [before[k] for k in ("state", "since")] != [after[k] for k in ("state", "since")]


def writer_reasons(before: dict, after: dict) -> list:
    reasons = []
    state = after["state"]
    if state != PRIMARY:
        why = f" ({after['reason']})" if after.get("reason") else ""
        reasons.append((WARNING, f"writer is in {state}{why}: the primary is behind until sync replays "
                                 "the backlog"))
    if writer_changed(before, after):
        reasons.append((WARNING, f"writer state changed during the check ({before['state']} -> "
                                 f"{state}); run again for a firm answer"))
    return reasons


def comparison_reasons(r: SourceResult, behind_level: int) -> list:
    if not r.missing.count:
        return []
    return [(behind_level, f"{r.source}: {r.missing.count} trades missing from the primary "
                           f"{r.missing.in_ranges()}")]


def audit_reasons(r: SourceResult, behind_level: int, window: Window) -> list:
    reasons = []
    if r.duplicated:
        ids = ", ".join(str(i) for i in r.duplicated_ids)
        reasons.append((CRITICAL, f"{r.source}: {r.duplicated} duplicate trade entries in the primary "
                                  f"(ids {ids})"))
    if r.lost_marked.count:
        # Never the writer's state to blame: the apply script sets a bit and appends its entry atomically.
        reasons.append((CRITICAL, f"{r.source}: {r.lost_marked.count} entries lost although marked applied "
                                  f"(gone from the primary's stream, set in its seen-set: "
                                  f"{r.lost_marked.shown()}); not repairable by re-sending, the apply "
                                  "script skips a trade its seen-set marks applied"))
    if r.settling_missing and not r.missing.count:
        reasons.append((WARNING, f"{r.source}: {r.settling_missing} trades of the last "
                                 f"{SETTLE_MS // 1000} s not in the primary yet"))
    differing = r.differing_minutes()
    if differing and not (r.absent_in_window or r.only_in_primary or r.duplicated):
        reasons.append((WARNING, f"{r.source}: trade counts differ in {len(differing)} minutes although "
                                 "the ids agree: the same trade ids carry different trade times"))
    local_last, primary_last = r.local_last, r.primary_last
    if (local_last and local_last["rts"] < window.settle_ms
            and (primary_last is None or primary_last["id"] < local_last["id"])):
        behind = primary_last["id"] if primary_last else "none"
        reasons.append((behind_level, f"{r.source}: last id in the primary ({behind}) is behind the "
                                      f"local copy ({local_last['id']})"))
    return reasons


# --- repair -------------------------------------------------------------------------------------
def repair(cfg, local, primary, check: Check, log) -> List[dict]:
    """Re-send what the comparison found missing, as sync does: from the local copy, through the
    idempotent apply (a trade that arrived meanwhile is skipped, nothing can be doubled), under the
    epoch this host verified (a primary that lost btcfeed's data since refuses rather than taking a part)."""
    compat = cfg.compat_source.name if cfg.compat_source else None
    try:
        known = known_epochs(local)
    except redis.RedisError as exc:
        raise LocalFailure(f"reading the known epochs: {describe_error(exc)}")
    applier = BatchApplier(primary, cfg.retention_ms, compat, cfg.compat_history_len, epochs=known)
    done = []
    for result in check.sources:
        if not result.missing.count:
            continue
        if result.source not in known:
            done.append({"source": result.source, "missing": result.missing.count, "added": 0,
                         "refused": NO_EPOCH.format(source=result.source)})
            continue
        done.append(repair_source(cfg, local, applier, result, log))
    return done


def repair_source(cfg, local, applier: BatchApplier, result: SourceResult, log) -> dict:
    try:
        resent = resend(result.index, applier, result.difference)
    except redis.RedisError as exc:
        failure = blame(local, exc, f"repair of {result.source}")
        record_event(local, log, PROCESS, "repair_failed", level="error", source=result.source,
                     reason=scrub_secrets(str(failure), cfg.primary_url))
        raise failure
    item = {"source": result.source, "missing": result.missing.count, "added": resent.applied,
            "skipped": resent.skipped, "floored": resent.floored, "not_held": resent.not_held}
    record_event(local, log, PROCESS, "repair", level="warning", **item,
                 ranges=", ".join(format_range(*run) for run in result.missing.ranges[:RANGES_SHOWN]))
    return item


def unrepairable_notes(check: Check) -> List[str]:
    return [LOST_MARKED_NOTE.format(source=r.source, count=r.lost_marked.count)
            for r in check.sources if r.lost_marked.count]


# --- output -------------------------------------------------------------------------------------
def summary(check: Check) -> str:
    if check.reasons:
        worst = [text for level, text in check.reasons if level == check.status]
        others = len(check.reasons) - len(worst)
        return "; ".join(worst) + (f" (+{others} more)" if others else "")
    trades = sum(r.local_trades for r in check.sources)
    segments = sum(r.segments_compared for r in check.sources)
    return (f"the primary holds every trade of the local copy ({segments} held segments compared, "
            f"{trades} trades audited, {len(check.sources)} source{'s' if len(check.sources) != 1 else ''})")


def comparison_line(r: SourceResult) -> str:
    ranges = f" {r.missing.in_ranges()}" if r.missing.count else ""
    return (f"{r.source}: seen-set comparison: {r.segments_compared} held segments compared, "
            f"missing {r.missing.count}{ranges}")


def audit_line(r: SourceResult) -> str:
    local_last = r.local_last["id"] if r.local_last else "none"
    primary_last = r.primary_last["id"] if r.primary_last else "none"
    return (f"{r.source}: stream audit: local {r.local_trades} primary {r.primary_trades} "
            f"duplicated {r.duplicated} lost-although-marked-applied {r.lost_marked.count} "
            f"only-in-primary {r.only_in_primary} settling {r.settling_missing} | "
            f"minutes {len(r.minutes)} ({len(r.differing_minutes())} differ) | "
            f"last id local {local_last} primary {primary_last}")


def detail_lines(check: Check) -> List[str]:
    lines = []
    for r in check.sources:
        lines.append(comparison_line(r))
        if r.missing.count:
            lines.append(f"  missing: {r.missing.shown()}")
        lines.append(audit_line(r))
        if r.lost_marked.count:
            lines.append(f"  lost although marked applied: {r.lost_marked.shown()}")
    return lines


def verified_age_s(check: Check) -> Optional[float]:
    if check.verified_ms is None or check.window is None:
        return None
    return round(max(0, check.window.now_ms - check.verified_ms) / 1000, 1)


def context_line(check: Check) -> Optional[str]:
    if not check.primary_url:       # the configuration could not be read: nothing to add
        return None
    checked = _iso(check.window.now_ms) if check.window else _iso(int(time.time() * 1000))
    text = f"checked {checked} in {check.elapsed_s:.1f} s; writer {check.writer.get('state', 'unknown')}"
    age = verified_age_s(check)
    text += "; sync has not verified yet" if age is None else f"; sync verified {age:.1f} s ago"
    if check.window and check.sources:
        text += f"; audit window rts {_iso(check.window.from_ms)} .. {_iso(check.window.settle_ms)}"
    return text + f"; primary {check.primary_url}; local {check.local_url}"


def status_line(check: Check, text: str = None) -> str:
    return f"SYNC-CHECK {STATUS_NAMES[check.status].upper()} - {text or summary(check)}"


def render_text(check: Check) -> str:
    lines = [status_line(check), *detail_lines(check), context_line(check)]
    return "\n".join(line for line in lines if line)


def repair_line(item: dict) -> str:
    if "refused" in item:
        return f"repair: {item['refused']}"
    notes = []
    if item["skipped"]:
        notes.append(f"{item['skipped']} arrived meanwhile")
    if item["floored"]:
        notes.append(f"{item['floored']} below the primary's floor, older than its window")
    if item["not_held"]:
        notes.append(f"{item['not_held']} no longer in the local copy")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"repair: {item['source']}: added {item['added']} of {item['missing']} missing trades{extra}"


def render_repaired(before: Check, repaired: List[dict], after: Check) -> str:
    added = sum(item["added"] for item in repaired)
    lines = [status_line(after, f"repaired {added} trades; {summary(after)}"), "before repair:",
             "  " + status_line(before)]
    lines += ["  " + line for line in detail_lines(before)]
    lines += [repair_line(item) for item in repaired]
    lines += [f"repair: {note}" for note in unrepairable_notes(before)]
    lines.append("after repair:")
    lines += ["  " + line for line in detail_lines(after)]
    lines.append(context_line(after))
    return "\n".join(lines)


def source_document(r: SourceResult) -> dict:
    differing = r.differing_minutes()
    return {
        "source": r.source,
        "local_trades": r.local_trades,
        "primary_trades": r.primary_trades,
        "missing": r.missing.count,
        "missing_ranges": [[first, last] for first, last in r.missing.ranges],
        "missing_ranges_total": r.missing.total,
        "held_segments_compared": r.segments_compared,
        "settling_missing": r.settling_missing,
        "only_in_primary": r.only_in_primary,
        "duplicated": r.duplicated,
        "duplicated_ids": r.duplicated_ids,
        "lost_marked_applied": r.lost_marked.count,
        "lost_marked_applied_ranges": [[first, last] for first, last in r.lost_marked.ranges],
        "lost_marked_applied_ranges_total": r.lost_marked.total,
        "minutes_compared": len(r.minutes),
        "minutes_differing_total": len(differing),
        "minutes_differing": [{"minute": _iso(m), "minute_ms": m, "local": r.minutes[m][0],
                               "primary": r.minutes[m][1]} for m in differing[:MINUTES_IN_JSON]],
        "last_id": {"local": r.local_last["id"] if r.local_last else None,
                    "primary": r.primary_last["id"] if r.primary_last else None},
    }


def document(check: Check) -> dict:
    window = check.window
    return {
        "status": STATUS_NAMES[check.status],
        "exit_code": check.status,
        "summary": summary(check),
        "reasons": [{"level": STATUS_NAMES[level], "text": text} for level, text in check.reasons],
        "checked_at": _iso(window.now_ms) if window else None,
        "elapsed_s": round(check.elapsed_s, 3),
        "writer": check.writer,
        "sync": {"verified_ms": check.verified_ms, "verified_age_s": verified_age_s(check)},
        "primary": check.primary_url,
        "local": check.local_url,
        # The stream audit's window; the seen-set comparison covers every segment the held index knows.
        "window": {"from_ms": window.from_ms, "to_ms": window.settle_ms, "settle_s": SETTLE_MS / 1000}
        if window else None,
        "sources": [source_document(r) for r in check.sources],
    }


def unknown_check(reason: str, primary_url: str = "", local_url: str = "") -> Check:
    return failed_check(UNKNOWN, reason, primary_url, local_url)


def failed_check(status: int, reason: str, primary_url: str = "", local_url: str = "") -> Check:
    """A check that could not run. A configuration error is CRITICAL: exit 2, as from every command."""
    return Check(status, [(status, reason)], {}, None, [], 0.0, primary_url, local_url)


# --- command (its options are defined in commands/cli.py) --------------------------------------
def run(repair: bool, as_json: bool) -> int:
    """Print the check (and the repair, with --repair) as text or JSON; returns the exit code."""
    out = Output(as_json)
    emit = out.emit
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        return emit(failed_check(CRITICAL, f"configuration error: {exc}"))
    out.secrets = secrets_of(cfg)
    primary_url, local_url = redact_url(cfg.primary_url), redact_url(cfg.local_url)
    try:
        local = connect_local(cfg.local_url, LOCAL_TIMEOUT_S)
        probe = connect_primary(cfg, cfg.primary_timeout_ms)
        primary = connect_primary(cfg, max(cfg.primary_timeout_ms, SCAN_TIMEOUT_MS))
    except ValueError as exc:
        reason = scrub_secrets(str(exc), cfg.primary_url)
        return emit(failed_check(CRITICAL, f"configuration error: {reason}", primary_url, local_url))
    try:
        local.ping()
    except redis.RedisError as exc:
        return emit(unknown_check(f"local Redis {local_url} unreachable: {describe_error(exc)}",
                                  primary_url, local_url))
    try:
        check = run_check(cfg, local, probe, primary)
        if not repair:
            return emit(check)
        return repair_and_recheck(cfg, local, probe, primary, check, out)
    except LocalFailure as exc:
        return emit(unknown_check(f"local Redis {local_url} failed: {exc}", primary_url, local_url))


def repair_and_recheck(cfg, local, probe, primary, check: Check, out: "Output") -> int:
    emit = out.emit
    if check.writer.get("state") != PRIMARY:
        # sync owns the primary until it hands the writer back; its replay fills these holes.
        text = (f"not repairing: the writer is in {check.writer.get('state')}; sync replays the backlog into "
                "the primary and hands back, run the check again after that")
        return emit(check, notes=[text], status=max(WARNING, check.status))
    if not check.sources:
        return emit(check, notes=["cannot repair: the check did not complete"])
    if not any(r.missing.count for r in check.sources):
        return emit(check, notes=["nothing to repair", *unrepairable_notes(check)])
    if read_writer(local) != check.writer:
        return emit(check, notes=["not repairing: the writer changed state since the check; run again"],
                    status=max(WARNING, check.status))
    log = EventLog(PROCESS, cfg.log_format, cfg.log_level, stream=sys.stderr)
    try:
        repaired = repair(cfg, local, primary, check, log)
    except PrimaryFailure as exc:
        return emit(check, notes=[f"repair failed: {scrub_secrets(str(exc), cfg.primary_url)}"],
                    status=max(CRITICAL, check.status))
    after = run_check(cfg, local, probe, primary)
    if out.as_json:
        doc = document(after)
        doc["repair"] = {"added": sum(item["added"] for item in repaired), "sources": repaired,
                         "not_repairable": unrepairable_notes(check), "before": document(check)}
        out.write(json.dumps(doc, indent=2))
    else:
        out.write(render_repaired(check, repaired, after))
    return after.status


class Output:
    """Prints the report, as text or JSON; nothing printed can carry a password from the URLs."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.secrets: List[str] = []

    def write(self, text: str) -> None:
        print(scrub(text, self.secrets))

    def emit(self, check: Check, notes=(), status: int = None) -> int:
        """Print one check (and notes); returns the exit code, the check's unless status overrides it."""
        status = check.status if status is None else status
        if self.as_json:
            doc = document(check)
            doc["status"], doc["exit_code"] = STATUS_NAMES[status], status
            if notes:
                doc["notes"] = list(notes)
            self.write(json.dumps(doc, indent=2))
            return status
        text = render_text(check)
        if status != check.status:
            # The first line is what monitoring shows: it carries the final status.
            first, _, rest = text.partition("\n")
            text = f"SYNC-CHECK {STATUS_NAMES[status].upper()} - {notes[0]}\n{first}\n{rest}"
            notes = notes[1:]
        self.write("\n".join([text, *notes]))
        return status


def _reason(exc: Exception) -> str:
    """Redis errors get their hint; a malformed local entry (a stream field, a mirrored batch) its text."""
    if isinstance(exc, redis.RedisError):
        return describe_error(exc)
    return str(exc) if isinstance(exc, MalformedEntry) else f"{type(exc).__name__}: {exc}"


def scrub_secrets(text: str, url: str) -> str:
    """The text with the URL's password removed, should a library ever put it into an error message."""
    return scrub(text, url_secrets(url))


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value
