"""bin/sync-check: compare the primary with the local copy over the retention window, and fill its holes.

What is compared, per source, for trades received (rts) inside the window:
  - trade ids in the local copy's stream that the primary's stream lacks, as ranges of ids;
  - ids that occur more than once in the primary's stream (anywhere in it);
  - trades per minute (by the trade's own ts), counted from both streams;
  - the last hashes (the highest id each side has seen).

Per-minute counts come from the streams, not from the candles' `n`: the streams are what consumers
read and what the id comparison has to scan anyway, and a candle can agree with its twin while the
stream behind it lost or doubled entries.

Exit codes follow the Nagios convention of bin/health: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, Iterator, List, Optional, Tuple

import redis

from common import config as config_module
from common import keys
from common.apply import BatchApplier, read_local_copy, read_mirror_since
from common.bus import connect_local
from common.config import redact_url, scrub, secrets_of, url_secrets
from common.events import record_event
from common.lifecycle import EventLog
from common.trade import encode_batch
from common.primary import connect_primary
from processes.writer import PRIMARY, describe_error

PROCESS = "sync-check"
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATUS_NAMES = {OK: "ok", WARNING: "warning", CRITICAL: "critical", UNKNOWN: "unknown"}

# Trades received this recently may still be on their way (bus -> primary -> local mirror).
SETTLE_MS = 5_000
# Each server trims its stream by entry time (MINID ~) on its own schedule and clock, so the oldest
# part of the retention window may already be gone from one side only: start the comparison later.
TRIM_GRACE_MS = 10 * 60_000
SCAN_CHUNK = 10_000
# Reading 10,000 entries, or sending a repair pipeline, can take longer than the writer's sub-second
# timeout; the first ping keeps the short one so that a dead primary is still reported quickly.
SCAN_TIMEOUT_MS = 5_000
LOCAL_TIMEOUT_S = 5.0
REPAIR_BATCHES_PER_CALL = 16
RANGES_SHOWN = 10
RANGES_IN_JSON = 1_000
MINUTES_IN_JSON = 100
DUPLICATES_LISTED = 10

# --- a compact set of trade ids ------------------------------------------------------------------
SEGMENT_BITS = 16
SEGMENT_BYTES = (1 << SEGMENT_BITS) // 8
SEGMENT_MASK = (1 << SEGMENT_BITS) - 1


class IdSet:
    """Trade ids as bitmap segments of 2**16 ids: about one bit per trade, as exchange ids are consecutive."""

    def __init__(self):
        self.segments: Dict[int, bytearray] = {}

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


# --- the check ----------------------------------------------------------------------------------
class LocalFailure(Exception):
    """The local Redis failed: nothing can be said about the primary (UNKNOWN)."""


class PrimaryFailure(Exception):
    """The primary failed to answer (CRITICAL)."""


class MalformedEntry(ValueError):
    """A trade stream entry without readable id, ts or rts fields."""


@dataclass(frozen=True)
class Window:
    now_ms: int
    from_ms: int      # trades received at or after this are compared ...
    settle_ms: int    # ... up to this; newer ones may still be in flight

    @classmethod
    def ending(cls, now_ms: int, retention_ms: int) -> "Window":
        grace = min(TRIM_GRACE_MS, retention_ms // 10)
        return cls(now_ms, now_ms - retention_ms + grace, now_ms - SETTLE_MS)


@dataclass
class SourceResult:
    source: str
    local_trades: int = 0
    primary_trades: int = 0
    missing: IdSet = field(default_factory=IdSet)
    missing_count: int = 0
    ranges: List[Tuple[int, int]] = field(default_factory=list)   # the first RANGES_IN_JSON
    range_count: int = 0
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


def run_check(cfg, local, probe, primary) -> Check:
    """One comparison of every source. The local copy is read before the primary: in primary state the
    writer applies to the primary before it mirrors locally, so a trade seen locally is already there."""
    started = time.monotonic()
    window = Window.ending(int(time.time() * 1000), cfg.retention_ms)
    writer_before = read_writer(local)

    def finish(reasons, sources, writer=writer_before) -> Check:
        status = max((level for level, _ in reasons), default=OK)
        return Check(status, reasons, writer, window, sources, time.monotonic() - started,
                     redact_url(cfg.primary_url), redact_url(cfg.local_url))

    try:
        probe.ping()
    except redis.RedisError as exc:
        reason = scrub_secrets(describe_error(exc), cfg.primary_url)
        return finish([(CRITICAL, f"primary unreachable: {reason}")], [])
    results = []
    try:
        for source in cfg.sources:
            result = SourceResult(source.name)
            local_ids, settling = scan_local(local, result, window)
            present = scan_primary(primary, result, window, local_ids)
            result.missing = local_ids.difference(present)
            result.missing_count = len(result.missing)
            for number, run in enumerate(result.missing.ranges()):
                if number < RANGES_IN_JSON:
                    result.ranges.append(run)
                result.range_count = number + 1
            result.settling_missing = len(settling.difference(present))
            results.append(result)
    except PrimaryFailure as exc:
        reason = scrub_secrets(str(exc), cfg.primary_url)
        return finish([(CRITICAL, f"primary failed during the check: {reason}")], [])
    writer_after = read_writer(local)
    return finish(assess(results, writer_before, writer_after, window), results, writer_after)


def assess(results: List[SourceResult], writer_before: dict, writer_after: dict, window: Window) -> list:
    """(level, reason) pairs; no pair means the primary holds everything the local copy holds."""
    reasons = []
    state = writer_after["state"]
    changed = [writer_before[k] for k in ("state", "since")] != [writer_after[k] for k in ("state", "since")]
    # In failover and draining the primary is behind by design: the backlog holds the difference.
    behind_expected = state != PRIMARY or writer_before["state"] != PRIMARY or changed
    if state != PRIMARY:
        why = f" ({writer_after['reason']})" if writer_after.get("reason") else ""
        reasons.append((WARNING, f"writer is in {state}{why}: the primary is behind until sync replays "
                                 "the backlog"))
    if changed:
        reasons.append((WARNING, f"writer state changed during the check ({writer_before['state']} -> "
                                 f"{state}); run again for a firm answer"))
    behind_level = WARNING if behind_expected else CRITICAL
    for r in results:
        if r.duplicated:
            ids = ", ".join(str(i) for i in r.duplicated_ids)
            reasons.append((CRITICAL, f"{r.source}: {r.duplicated} duplicate trade entries in the primary "
                                      f"(ids {ids})"))
        if r.missing_count:
            reasons.append((behind_level, f"{r.source}: {r.missing_count} trades missing from the primary "
                                          f"in {r.range_count} range{'s' if r.range_count != 1 else ''}"))
        elif r.settling_missing:
            reasons.append((WARNING, f"{r.source}: {r.settling_missing} trades of the last "
                                     f"{SETTLE_MS // 1000} s not in the primary yet"))
        differing = r.differing_minutes()
        if differing and not (r.missing_count or r.only_in_primary or r.duplicated):
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
    """Apply the missing trades from the local copy to the primary with the same idempotent apply the
    writer uses: the primary's seen-set skips any trade it already holds, so nothing can be doubled."""
    compat = cfg.compat_source.name if cfg.compat_source else None
    applier = BatchApplier(primary, cfg.retention_ms, compat, cfg.compat_history_len)
    done = []
    for result in check.sources:
        if not result.missing_count:
            continue
        counts = {"source": result.source, "missing": result.missing_count, "added": 0, "skipped": 0}
        try:
            _repair_source(cfg, local, applier, result, counts)
        except (PrimaryFailure, LocalFailure) as exc:
            record_event(local, log, PROCESS, "repair_failed", level="error", source=result.source,
                         added=counts["added"], reason=scrub_secrets(str(exc), cfg.primary_url))
            raise
        record_event(local, log, PROCESS, "repair", level="warning", source=result.source,
                     missing=counts["missing"], added=counts["added"], skipped=counts["skipped"],
                     ranges=", ".join(format_range(*run) for run in result.ranges[:RANGES_SHOWN]))
        done.append(counts)
    return done


def _repair_source(cfg, local, applier: BatchApplier, result: SourceResult, counts: dict) -> None:
    batches, pending = [], []

    def send(batches_to_send):
        try:
            replies = applier.apply_many([(result.source, payload) for payload in batches_to_send],
                                         int(time.time() * 1000))
        except redis.RedisError as exc:
            raise PrimaryFailure(f"repair of {result.source} stopped after {counts['added']} trades: "
                                 f"{describe_error(exc)}")
        counts["added"] += sum(applied for applied, _ in replies)
        counts["skipped"] += sum(skipped for _, skipped in replies)

    try:
        for chunk in read_local_copy(local, result.source, SCAN_CHUNK):
            for trade in chunk:
                if trade.id in result.missing:
                    pending.append(trade)
                    if len(pending) >= cfg.writer_max_batch:
                        batches.append(encode_batch(pending))
                        pending = []
            if len(batches) >= REPAIR_BATCHES_PER_CALL:
                send(batches)
                batches = []
    except redis.RedisError as exc:
        raise LocalFailure(f"reading the local copy of {result.source} for repair: {describe_error(exc)}")
    if pending:
        batches.append(encode_batch(pending))
    if batches:
        send(batches)


# --- output -------------------------------------------------------------------------------------
def summary(check: Check) -> str:
    if check.reasons:
        worst = [text for level, text in check.reasons if level == check.status]
        others = len(check.reasons) - len(worst)
        return "; ".join(worst) + (f" (+{others} more)" if others else "")
    trades = sum(r.local_trades for r in check.sources)
    return (f"the primary holds every trade of the local copy ({trades} trades, "
            f"{len(check.sources)} source{'s' if len(check.sources) != 1 else ''})")


def source_line(r: SourceResult) -> str:
    local_last = r.local_last["id"] if r.local_last else "none"
    primary_last = r.primary_last["id"] if r.primary_last else "none"
    ranges = f" in {r.range_count} range{'s' if r.range_count != 1 else ''}" if r.missing_count else ""
    return (f"{r.source}: local {r.local_trades} primary {r.primary_trades} "
            f"missing {r.missing_count}{ranges} "
            f"duplicated {r.duplicated} only-in-primary {r.only_in_primary} settling {r.settling_missing} | "
            f"minutes {len(r.minutes)} ({len(r.differing_minutes())} differ) | "
            f"last id local {local_last} primary {primary_last}")


def ranges_line(r: SourceResult) -> Optional[str]:
    if not r.missing_count:
        return None
    shown = ", ".join(format_range(*run) for run in r.ranges[:RANGES_SHOWN])
    more = r.range_count - min(r.range_count, RANGES_SHOWN)
    return f"  missing: {shown}" + (f" and {more} more ranges" if more else "")


def detail_lines(check: Check) -> List[str]:
    lines = []
    for r in check.sources:
        lines.append(source_line(r))
        if ranges_line(r):
            lines.append(ranges_line(r))
    return lines


def context_line(check: Check) -> Optional[str]:
    if not check.primary_url:       # the configuration could not be read: nothing to add
        return None
    checked = _iso(check.window.now_ms) if check.window else _iso(int(time.time() * 1000))
    text = f"checked {checked} in {check.elapsed_s:.1f} s; writer {check.writer.get('state', 'unknown')}"
    if check.window and check.sources:
        text += f"; window rts {_iso(check.window.from_ms)} .. {_iso(check.window.settle_ms)}"
    return text + f"; primary {check.primary_url}; local {check.local_url}"


def status_line(check: Check, text: str = None) -> str:
    return f"SYNC-CHECK {STATUS_NAMES[check.status].upper()} - {text or summary(check)}"


def render_text(check: Check) -> str:
    lines = [status_line(check), *detail_lines(check), context_line(check)]
    return "\n".join(line for line in lines if line)


def render_repaired(before: Check, repaired: List[dict], after: Check) -> str:
    added = sum(item["added"] for item in repaired)
    lines = [status_line(after, f"repaired {added} trades; {summary(after)}"), "before repair:",
             "  " + status_line(before)]
    lines += ["  " + line for line in detail_lines(before)]
    for item in repaired:
        skipped = ""
        if item["skipped"]:
            skipped = (f" ({item['skipped']} skipped: the primary's seen-set marks them applied although its "
                       "stream lacks them; not re-added, to keep each trade exactly once)")
        lines.append(f"repair: {item['source']}: added {item['added']} of {item['missing']} "
                     f"missing trades{skipped}")
    lines.append("after repair:")
    lines += ["  " + line for line in detail_lines(after)]
    lines.append(context_line(after))
    return "\n".join(lines)


def document(check: Check) -> dict:
    sources = []
    for r in check.sources:
        differing = r.differing_minutes()
        sources.append({
            "source": r.source,
            "local_trades": r.local_trades,
            "primary_trades": r.primary_trades,
            "missing": r.missing_count,
            "missing_ranges": [[first, last] for first, last in r.ranges],
            "missing_ranges_total": r.range_count,
            "settling_missing": r.settling_missing,
            "only_in_primary": r.only_in_primary,
            "duplicated": r.duplicated,
            "duplicated_ids": r.duplicated_ids,
            "minutes_compared": len(r.minutes),
            "minutes_differing_total": len(differing),
            "minutes_differing": [{"minute": _iso(m), "minute_ms": m, "local": r.minutes[m][0],
                                   "primary": r.minutes[m][1]} for m in differing[:MINUTES_IN_JSON]],
            "last_id": {"local": r.local_last["id"] if r.local_last else None,
                        "primary": r.primary_last["id"] if r.primary_last else None},
        })
    window = check.window
    return {
        "status": STATUS_NAMES[check.status],
        "exit_code": check.status,
        "summary": summary(check),
        "reasons": [{"level": STATUS_NAMES[level], "text": text} for level, text in check.reasons],
        "checked_at": _iso(window.now_ms) if window else None,
        "elapsed_s": round(check.elapsed_s, 3),
        "writer": check.writer,
        "primary": check.primary_url,
        "local": check.local_url,
        "window": {"from_ms": window.from_ms, "to_ms": window.settle_ms, "settle_s": SETTLE_MS / 1000}
        if window else None,
        "sources": sources,
    }


def unknown_check(reason: str, primary_url: str = "", local_url: str = "") -> Check:
    return Check(UNKNOWN, [(UNKNOWN, reason)], {}, None, [], 0.0, primary_url, local_url)


# --- command ------------------------------------------------------------------------------------
class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse would exit 2, which is CRITICAL to a monitoring system; a usage error is UNKNOWN.
        raise UsageError(message)


def parse_arguments(argv):
    parser = ArgumentParser(prog="sync-check", description=(
        "Compare the primary Redis with the local copy over the retention window; report trades missing "
        "from the primary, duplicates and per-minute counts. Exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."))
    parser.add_argument("--repair", action="store_true",
                        help="re-apply the missing trades from the local copy to the primary, "
                             "then check again")
    parser.add_argument("--json", action="store_true", help="print the report as a JSON document")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_arguments(argv)
    except UsageError as exc:
        print(f"SYNC-CHECK UNKNOWN - usage: {exc} (see --help)")
        return UNKNOWN
    except SystemExit as exc:     # --help
        return exc.code or OK
    out = Output(args.json)
    emit = out.emit
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        return emit(unknown_check(f"configuration error: {exc}"))
    out.secrets = secrets_of(cfg)
    primary_url, local_url = redact_url(cfg.primary_url), redact_url(cfg.local_url)
    try:
        local = connect_local(cfg.local_url, LOCAL_TIMEOUT_S)
        probe = connect_primary(cfg, cfg.primary_timeout_ms)
        primary = connect_primary(cfg, max(cfg.primary_timeout_ms, SCAN_TIMEOUT_MS))
    except ValueError as exc:
        reason = scrub_secrets(str(exc), cfg.primary_url)
        return emit(unknown_check(f"configuration error: {reason}", primary_url, local_url))
    try:
        local.ping()
    except redis.RedisError as exc:
        return emit(unknown_check(f"local Redis {local_url} unreachable: {describe_error(exc)}",
                                  primary_url, local_url))
    try:
        check = run_check(cfg, local, probe, primary)
        if not args.repair:
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
    if not any(r.missing_count for r in check.sources):
        note = "nothing to repair" if check.sources else "cannot repair: the check did not complete"
        return emit(check, notes=[note])
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
                         "before": document(check)}
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
    return str(exc) if isinstance(exc, MalformedEntry) else describe_error(exc)


def scrub_secrets(text: str, url: str) -> str:
    """The text with the URL's password removed, should a library ever put it into an error message."""
    return scrub(text, url_secrets(url))


def _iso(ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


if __name__ == "__main__":
    raise SystemExit(main())
