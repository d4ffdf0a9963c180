"""`btcfeed monitor` (bin/monitor): a live terminal dashboard of the health API's GET /status document.

The screen is built by a pure function, render(status, width, height), so tests (and --once)
can draw the same frame the live view shows. Every field of the document may be missing or null:
the dashboard shows "-" for it instead of failing.
"""

import http.client
import io
import json
import math
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Callable, List, Optional

from rich.console import Console, Group
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from btcfeed.observability.status import StatusCollector

BLOCKS = "▁▂▃▄▅▆▇█"
TIMELINE_WINDOW_MS = 10 * 60 * 1000
TIMELINE_FAILOVER = "█"
TIMELINE_NORMAL = "─"
BAR_DONE, BAR_TODO = "█", "░"

# Same thresholds as processes/health.py, so the colours agree with the health verdict.
HEARTBEAT_STALE_MS = 5000
TRADE_STALE_MS = 60_000
# A document older than this (live mode) is no longer a picture of now.
DOCUMENT_STALE_MS = 5000

FETCH_TIMEOUT_S = 2.0
MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
EXIT_NO_DATA = 3

STATUS_STYLES = {"ok": "green", "degraded": "yellow", "critical": "red"}
WRITER_STYLES = {"primary": "green", "failover": "yellow", "draining": "yellow"}
PROCESS_STATE_STYLES = {"RUNNING": "green", "STARTING": "yellow", "BACKOFF": "yellow", "STOPPING": "yellow"}
EVENT_LEVEL_STYLES = {"error": "red", "critical": "red", "warning": "yellow"}


# --- reading fields that may be missing, null or of the wrong type ------------------------------

def dig(document, *path):
    """document[path[0]][path[1]]..., or None as soon as a level is missing or not a mapping."""
    value = document
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def as_number(value) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def as_bool(value) -> Optional[bool]:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    word = value.strip().lower() if isinstance(value, str) else None
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    return None


def as_list(value) -> list:
    return value if isinstance(value, list) else []


def as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def style_for(styles: dict, value, otherwise: str = "") -> str:
    # Only a string can name a state; a list or dict where a state belongs gets no colour.
    return styles.get(value, otherwise) if isinstance(value, str) else otherwise


# --- formatting -----------------------------------------------------------------------------------

def format_text(value) -> str:
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split())


def format_int(value) -> str:
    number = as_number(value)
    return "-" if number is None else f"{round(number):,}"


def format_id(value) -> str:
    # Ids are read, compared and copied, not summed: no thousands separators.
    number = as_number(value)
    return "-" if number is None else str(round(number))


def format_decimal(value, places: int = 1) -> str:
    number = as_number(value)
    return "-" if number is None else f"{number:,.{places}f}"


def format_price(value) -> str:
    """The exchange's decimal string without trailing zeros (at least two decimals), never via float."""
    if value is None or isinstance(value, bool):
        return "-"
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        return "-"
    if not number.is_finite():
        return "-"
    whole, _, fraction = format(number, "f").partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def format_duration(seconds) -> str:
    """Human duration: 310ms, 42s, 3m05s, 1h00m, 2d03h."""
    number = as_number(seconds)
    if number is None:
        return "-"
    number = max(0.0, number)
    if number < 1:
        return f"{round(number * 1000)}ms"
    whole = round(number)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_age_ms(milliseconds) -> str:
    number = as_number(milliseconds)
    return "-" if number is None else format_duration(number / 1000)


def format_clock(epoch_ms, with_date: bool = False) -> str:
    number = as_number(epoch_ms)
    if number is None:
        return "-"
    try:
        moment = time.localtime(number / 1000)
    except (OverflowError, OSError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", moment)


def format_megabytes(value) -> str:
    number = as_number(value)
    return "-" if number is None else f"{number:.1f}MB"


def format_latency(value) -> str:
    number = as_number(value)
    if number is None:
        return "-"
    return f"{number:.2f}ms" if number < 10 else f"{number:.0f}ms"


# --- small pictures --------------------------------------------------------------------------------

def sparkline(values, width: Optional[int] = None) -> str:
    """One block character per value (the newest `width` values), lowest ▁ to highest █."""
    numbers = [n for n in (as_number(v) for v in as_list(values)) if n is not None]
    if width is not None:
        numbers = numbers[-width:] if width > 0 else []
    if not numbers:
        return ""
    low, high = min(numbers), max(numbers)
    if high == low:
        return BLOCKS[len(BLOCKS) // 2 - 1] * len(numbers)
    scale = (len(BLOCKS) - 1) / (high - low)
    return "".join(BLOCKS[round((n - low) * scale)] for n in numbers)


def failover_timeline(failovers, now_ms, window_ms: int = TIMELINE_WINDOW_MS, width: int = 40) -> str:
    """A bar of `width` cells over the last `window_ms` before now_ms; a cell is █ when the writer
    was failed over at any moment of it (so a short failover still shows), ─ otherwise. A failover
    without an end is ongoing: it runs to now, the right end of the bar."""
    now = as_number(now_ms)
    if now is None or width <= 0 or window_ms <= 0:
        return ""
    cells = [TIMELINE_NORMAL] * width
    window_start = now - window_ms
    cell_ms = window_ms / width
    for failover in as_list(failovers):
        begin = as_number(dig(failover, "start_ms"))
        end = as_number(dig(failover, "end_ms"))
        end = now if end is None else end
        if begin is None or end < begin or end < window_start or begin > now:
            continue
        first = int((max(begin, window_start) - window_start) // cell_ms)
        last = int((min(end, now) - window_start) // cell_ms)
        for index in range(max(0, first), min(width - 1, last) + 1):
            cells[index] = TIMELINE_FAILOVER
    return "".join(cells)


def progress_bar(done, total, width: int) -> str:
    done_n, total_n = as_number(done), as_number(total)
    if width <= 0 or done_n is None or not total_n or total_n <= 0:
        return ""
    filled = round(width * min(1.0, max(0.0, done_n / total_n)))
    return BAR_DONE * filled + BAR_TODO * (width - filled)


# --- sections --------------------------------------------------------------------------------------

def one_line(*parts) -> Text:
    """A line that is cut with an ellipsis rather than wrapped, so each section keeps its height."""
    text = Text.assemble(*parts)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def label(name: str) -> tuple:
    return (f"{name:<7} ", "bold")


def header_line(status: dict, now_ms: Optional[int]) -> Text:
    overall = dig(status, "health", "status")
    reasons = as_list(dig(status, "health", "reasons"))
    parts = [("btcfeed ", "bold"), (format_text(overall).upper(), style_for(STATUS_STYLES, overall))]
    if len(reasons) > 1:
        parts.append(f" ({len(reasons)} reasons)")
    parts.append(f"  {format_clock(status.get('generated_ms'), with_date=True)}")
    origin = status.get("origin")
    if origin == "direct":
        parts.append(("  read directly (health API unreachable)", "yellow"))
    else:
        parts.append(f"  via {'health API' if origin == 'health' else format_text(origin)}")
    generated = as_number(status.get("generated_ms"))
    if now_ms is not None and generated is not None and now_ms - generated > DOCUMENT_STALE_MS:
        parts.append((f"  stale: {format_age_ms(now_ms - generated)} old", "red"))
    return one_line(*parts)


def reason_line(status: dict) -> Optional[Text]:
    reasons = as_list(dig(status, "health", "reasons"))
    if not reasons:
        return None
    return one_line("  ", format_text(reasons[0]))


def price_line(status: dict, width: int) -> Text:
    price = as_dict(status.get("price"))
    history = [n for n in (as_number(v) for v in as_list(price.get("history"))) if n is not None]
    head = f"{format_price(price.get('last'))}  {format_text(price.get('source'))}  "
    tail = f"  {format_price(min(history))}–{format_price(max(history))}" if history else ""
    if width - 8 - len(head) - len(tail) < min(len(history), 8):
        tail = ""  # on a narrow terminal the sparkline says more than the range figures
    room = max(0, width - 8 - len(head) - len(tail))
    return one_line(label("price"), head, sparkline(history, width=min(room, 60)), tail)


SOURCE_COLUMNS = (
    # (header, justify, drop order: the highest goes first on a narrow terminal; 0 = never)
    ("source", "left", 0), ("conn", "left", 0), ("tr/s", "right", 3), ("age", "right", 1),
    ("last id", "right", 6), ("gaps", "right", 4), ("backfill", "right", 5), ("dead", "right", 2),
    ("reconn", "right", 7))


def sources_table(status: dict, width: int) -> Table:
    rows = []
    for name, feed in as_dict(status.get("sources")).items():
        feed = as_dict(feed)
        connected = as_bool(feed.get("connected"))
        age_ms = as_number(feed.get("last_trade_age_ms"))
        dead = as_number(feed.get("deadlettered"))
        rows.append([
            str(name),
            Text("-") if connected is None else Text("up", "green") if connected else Text("down", "red"),
            format_decimal(feed.get("trades_per_s")),
            Text(format_age_ms(age_ms), "red" if age_ms is not None and age_ms > TRADE_STALE_MS else ""),
            format_id(feed.get("last_id")),
            format_int(feed.get("gaps")),
            format_int(feed.get("backfilled")),
            Text(format_int(dead), "yellow" if dead else ""),
            format_int(feed.get("reconnects"))])
    return fitted_table(SOURCE_COLUMNS, rows, width)


def writer_line(status: dict) -> Text:
    writer = as_dict(status.get("writer"))
    state = writer.get("state")
    for_s = as_number(writer.get("for_s"))
    since, generated = as_number(writer.get("since_ms")), as_number(status.get("generated_ms"))
    if for_s is None and since is not None and generated is not None:
        for_s = (generated - since) / 1000
    parts = [label("writer"), (format_text(state), style_for(WRITER_STYLES, state))]
    if for_s is not None:
        parts.append(f" for {format_duration(for_s)}")
    if state != "primary" and writer.get("reason"):
        parts.append(f": {format_text(writer.get('reason'))}")
    return one_line(*parts)


def timeline_line(status: dict, width: int) -> Text:
    failovers = as_list(status.get("failovers"))
    ongoing = sum(1 for f in failovers
                  if isinstance(f, dict) and f.get("end_ms") is None and f.get("start_ms") is not None)
    head = f"-{TIMELINE_WINDOW_MS // 60000}m "
    tail = f" now  {len(failovers)} failover{'s' if len(failovers) != 1 else ''}" + (
        f", {ongoing} ongoing" if ongoing else "")
    bar_width = max(0, min(60, width - 9 - len(head) - len(tail)))
    bar = Text(failover_timeline(failovers, status.get("generated_ms"), width=bar_width))
    bar.highlight_regex(f"{TIMELINE_FAILOVER}+", "yellow")
    return one_line(label("failover"), head, bar, tail)


def backlog_line(status: dict, width: int) -> Text:
    backlog = as_dict(status.get("backlog"))
    head = f"{format_int(backlog.get('trades'))} trades in {format_int(backlog.get('entries'))} entries"
    if not as_bool(backlog.get("draining")):
        return one_line(label("backlog"), head)
    done, total = backlog.get("drain_done"), backlog.get("drain_total")
    figure = f" {format_id(done)}/{format_id(total)}"
    if as_number(done) is not None and as_number(total):
        figure += f" {100 * as_number(done) / as_number(total):.0f}%"
    rate = as_number(backlog.get("replay_rate"))
    tail = figure + (f"  {format_int(rate)}/s" if rate is not None else "") + (
        f"  ETA {format_duration(backlog.get('eta_s'))}" if backlog.get("eta_s") is not None else "")
    lead = f"{head}  draining "
    bar = progress_bar(done, total, max(0, min(30, width - 8 - len(lead) - len(tail))))
    return one_line(label("backlog"), lead, (bar, "yellow"), tail)


PROCESS_COLUMNS = (
    ("process", "left", 0), ("state", "left", 0), ("pid", "right", 6), ("uptime", "right", 3),
    ("restarts", "right", 2), ("cpu%", "right", 5), ("rss", "right", 4), ("heartbeat", "right", 1))


def processes_table(status: dict, width: int) -> Table:
    rows = []
    for name, process in as_dict(status.get("processes")).items():
        process = as_dict(process)
        state = process.get("state")
        if state is None and as_bool(process.get("reachable")) is False:
            state = "unreachable"  # supervisord itself did not answer
        restarts = as_number(process.get("restarts"))
        beat = as_number(process.get("heartbeat_age_ms"))
        rows.append([
            str(name).lstrip("_"),  # "_supervisor" is the document's entry for supervisord itself
            Text(format_text(state), style_for(PROCESS_STATE_STYLES, state, "red") if state else ""),
            format_id(process.get("pid")),
            format_duration(process.get("uptime_s")),
            Text(format_int(restarts), "yellow" if restarts else ""),
            format_decimal(process.get("cpu_percent")),
            format_megabytes(process.get("rss_mb")),
            Text(format_age_ms(beat), "red" if beat is not None and beat > HEARTBEAT_STALE_MS else "")])
    return fitted_table(PROCESS_COLUMNS, rows, width)


def redis_line(status: dict, which: str) -> Text:
    server = as_dict(dig(status, "redis", which))
    reachable = as_bool(server.get("reachable"))
    parts = [label(which)]
    if reachable is None:
        parts.append("-")
    elif not reachable:
        parts += [("unreachable", "red"), f"  {format_text(server.get('error'))}"]
    else:
        role = server.get("role")
        parts += [("up", "green"), f"  {format_latency(server.get('latency_ms'))}  ",
                  (format_text(role), "" if role in (None, "master") else "yellow"),
                  f"  {format_megabytes(server.get('used_memory_mb'))}"]
    # The URL goes last: a long socket path is what the ellipsis should cut, not the facts.
    parts.append(f"  {format_text(server.get('url'))}")
    return one_line(*parts)


def event_lines(status: dict, count: Optional[int]) -> List[Text]:
    events = [e for e in as_list(status.get("events")) if isinstance(e, dict)]
    # The API lists the newest first; the screen shows them oldest to newest, the newest at the bottom.
    events.sort(key=lambda e: e.get("ts") if isinstance(e.get("ts"), (int, float)) else 0)
    if count is not None:
        events = events[-count:] if count > 0 else []
    lines = []
    for event in events:
        fields = " ".join(f"{k}={format_text(v)}" for k, v in as_dict(event.get("fields")).items())
        lines.append(one_line(
            f"{format_clock(event.get('ts'))} {format_text(event.get('proc')):<8} ",
            (f"{format_text(event.get('event')):<13}", style_for(EVENT_LEVEL_STYLES, event.get("level"))),
            f" {fields}"))
    return lines


def compact_table(columns, rows) -> Table:
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False, padding=(0, 1),
                  show_edge=False, collapse_padding=True)
    for header, justify, _ in columns:
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis")
    for row in rows or [["-"] * len(columns)]:
        table.add_row(*row)
    return table


def fitted_table(columns, rows, width: int) -> Table:
    """The table with as many columns as fit in width: on a narrow terminal the least useful
    columns go entirely rather than every column being cut to an unreadable stub."""
    keep = list(range(len(columns)))
    # Measured without a width limit: the natural width, before rich would squeeze the columns.
    measurer = Console(file=io.StringIO(), width=10_000, color_system=None, legacy_windows=False)
    while True:
        table = compact_table([columns[i] for i in keep], [[row[i] for i in keep] for row in rows])
        droppable = [i for i in keep if columns[i][2] > 0]
        if not droppable or Measurement.get(measurer, measurer.options, table).maximum <= width:
            return table
        keep.remove(max(droppable, key=lambda i: columns[i][2]))


# --- layout ----------------------------------------------------------------------------------------

@dataclass
class Section:
    name: str
    keep_rank: int  # lower ranks are kept first when the terminal is too short for everything
    build: Callable[[], object]


def layout_sections(status: dict, width: int, now_ms: Optional[int]) -> List[Section]:
    """The sections in screen order (events come last, in whatever room is left)."""
    return [
        Section("header", 0, lambda: header_line(status, now_ms)),
        Section("reason", 4, lambda: reason_line(status)),
        Section("price", 2, lambda: price_line(status, width)),
        Section("sources", 5, lambda: sources_table(status, width)),
        Section("writer", 1, lambda: writer_line(status)),
        Section("timeline", 9, lambda: timeline_line(status, width)),
        Section("backlog", 3, lambda: backlog_line(status, width)),
        Section("processes", 7, lambda: processes_table(status, width)),
        Section("primary", 6, lambda: redis_line(status, "primary")),
        Section("local", 8, lambda: redis_line(status, "local")),
    ]


def build_section(section: Section):
    # One odd field must not take the whole dashboard down: that section says so, the rest stays.
    try:
        return section.build()
    except Exception as exc:  # noqa: BLE001 - any fault of one section is contained to it
        return one_line((f"({section.name}: cannot be drawn: {type(exc).__name__})", "red"))


def line_count(renderable, measurer: Console, width: int) -> int:
    return len(measurer.render_lines(renderable, measurer.options.update(width=width), pad=False))


def render(status: dict, width: int = 80, height: Optional[int] = 24, now_ms: Optional[int] = None,
           notice: Optional[Text] = None):
    """The dashboard for one status document, fitted to width × height (height None: no limit).
    When the height is short, the least important sections are left out; the events get the
    lines that remain, newest last."""
    status = status if isinstance(status, dict) else {}
    width = max(20, int(width))
    measurer = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    sections = layout_sections(status, width, now_ms)
    if notice is not None:
        sections.insert(0, Section("notice", -1, lambda: notice))
    blocks = [build_section(section) for section in sections]
    ranks = [section.keep_rank for section in sections]
    heights = [0 if block is None else line_count(block, measurer, width) for block in blocks]
    room = math.inf if height is None else max(0, int(height))
    kept = set()
    for index in sorted(range(len(blocks)), key=lambda i: ranks[i]):
        if blocks[index] is not None and heights[index] <= room:
            kept.add(index)
            room -= heights[index]
    events = []
    if room > 0:
        count = None if room == math.inf else int(room)
        events = build_section(Section("events", 10, lambda: event_lines(status, count)))
        events = events if isinstance(events, list) else [events]
    return Group(*[blocks[i] for i in range(len(blocks)) if i in kept], *events)


def render_text(status: dict, width: int = 80, height: Optional[int] = 24) -> str:
    """The frame as plain text (no ANSI), as a terminal of width × height would show it."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, legacy_windows=False, force_terminal=False)
    console.print(render(status, width=width, height=height))
    return buffer.getvalue()


def unreachable_notice(url: str, reading: "Reading", interval_s: float, compact: bool) -> Text:
    """What the screen says when no document could be had. Compact (one line each, cut to the
    width) when the last document is shown below it; in full when the notice is the whole screen."""
    lines = [Text(f"health API at {url} is unreachable: {reading.api_problem}", style="red"),
             Text(f"reading Redis directly failed too: {reading.direct_problem}"),
             Text(f"retrying every {interval_s:g}s (Ctrl-C to quit)")]
    if compact:
        lines[-1].append("; the figures below are the last ones read")
    notice = Text("\n").join(lines)
    if compact:
        notice.no_wrap, notice.overflow = True, "ellipsis"
    return notice


# --- getting the document --------------------------------------------------------------------------

class FetchError(Exception):
    """Why no status document could be had, in one line for the operator."""


def describe_network_error(reason, timeout_s: float = FETCH_TIMEOUT_S) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout_s:g}s"
    if isinstance(reason, socket.gaierror):
        return "unknown host"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return one_line_message(reason)


def one_line_message(value) -> str:
    text = " ".join(str(value).split()) or type(value).__name__
    # Any credentials in a URL inside an error message stay out of the screen.
    return re.sub(r"://[^/@\s]*@", "://***@", text)


def parse_document(body: bytes) -> dict:
    try:
        document = json.loads(body)
    except ValueError:
        raise FetchError("the answer is not JSON")
    if not isinstance(document, dict):
        raise FetchError("the answer is not a status document")
    return document


def fetch_status(url: str, token: Optional[str], timeout_s: float = FETCH_TIMEOUT_S) -> dict:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return parse_document(response.read(MAX_DOCUMENT_BYTES))
    except urllib.error.HTTPError as exc:
        # The health API answers 503 with the full document when the feed is critical.
        if exc.code == 503:
            try:
                return parse_document(exc.read(MAX_DOCUMENT_BYTES))
            except (FetchError, OSError):
                pass
        hint = {401: " (a token is needed: BTCFEED_HEALTH_TOKEN or --token-file)" if not token else
                " (the token was refused)", 403: " (the token was refused)",
                404: " (no /status here)"}.get(exc.code, "")
        raise FetchError(f"HTTP {exc.code} {exc.reason}{hint}")
    except urllib.error.URLError as exc:
        raise FetchError(describe_network_error(exc.reason, timeout_s))
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(describe_network_error(exc, timeout_s))


def reached_anything(document: dict) -> bool:
    """Whether a direct reading got through to the local Redis, the primary or supervisord."""
    servers = (dig(document, "redis", "local", "reachable"), dig(document, "redis", "primary", "reachable"))
    processes = as_dict(document.get("processes")).values()
    return any(as_bool(s) for s in servers) or any(isinstance(p, dict) and p.get("state") for p in processes)


@dataclass
class Reading:
    document: Optional[dict]
    api_problem: Optional[str] = None     # why the health API gave no document (None when it did)
    direct_problem: Optional[str] = None  # why reading Redis directly gave none either

    @property
    def problem(self) -> str:
        return f"{self.api_problem}; reading Redis directly failed too: {self.direct_problem}"


class StatusSource:
    def __init__(self, url: str, token: Optional[str], cfg, timeout_s: float = FETCH_TIMEOUT_S):
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.cfg = cfg
        self.collector = None

    def read(self) -> Reading:
        try:
            return Reading(fetch_status(self.url, self.token, self.timeout_s))
        except FetchError as api_error:
            api_problem = self.scrub(str(api_error))
        try:
            document = self.collect_directly()
        except FetchError as direct_error:
            return Reading(None, api_problem, self.scrub(str(direct_error)))
        if not reached_anything(document):
            first = format_text((as_list(dig(document, "health", "reasons")) or ["nothing answered"])[0])
            return Reading(None, api_problem, self.scrub(first))
        return Reading(document, api_problem)

    def collect_directly(self) -> dict:
        """The same document read straight from Redis and supervisord (origin "direct"). One collector
        is kept between frames, so trade rates, CPU and the price history fill in as in the API; it is
        made at the first direct reading, as making it connects to the primary (a Cluster's, say)."""
        try:
            if self.collector is None:
                self.collector = StatusCollector(self.cfg, origin="direct")
            return self.collector.collect()
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the operator gets one line
            raise FetchError(f"{type(exc).__name__}: {one_line_message(exc)}")

    def scrub(self, message: str) -> str:
        return message.replace(self.token, "***") if self.token else message


# --- showing it (the command's options are in commands/cli.py) -----------------------------------

def show_once(source: StatusSource) -> int:
    reading = source.read()
    if reading.document is None:
        print(f"monitor: health API at {source.url} is unreachable: {reading.problem}", file=sys.stderr)
        return EXIT_NO_DATA
    console = Console()
    notice = direct_reading_notice(source.url, reading.api_problem)
    console.print(render(reading.document, width=console.width, height=console.height, notice=notice))
    return 0


def direct_reading_notice(url: str, problem: Optional[str]) -> Optional[Text]:
    # Says why the health API was bypassed: a refused token reads very differently from a dead process.
    if problem is None:
        return None
    return one_line((f"health API at {url}: {problem}", "yellow"))


def live_frame(source: StatusSource, last: Optional[dict], console: Console, interval_s: float):
    """The next frame and the newest document seen (kept to show, marked stale, during an outage)."""
    reading = source.read()
    width, height = console.width, console.height
    now_ms = int(time.time() * 1000)
    if reading.document is not None:
        notice = direct_reading_notice(source.url, reading.api_problem)
        frame = render(reading.document, width=width, height=height, now_ms=now_ms, notice=notice)
        return frame, reading.document
    if last is None:
        return unreachable_notice(source.url, reading, interval_s, compact=False), None
    notice = unreachable_notice(source.url, reading, interval_s, compact=True)
    return render(last, width=width, height=height, now_ms=now_ms, notice=notice), last


class StopRequested(BaseException):
    """Raised by SIGINT/SIGTERM; a BaseException so that no `except Exception` on the way
    (in the direct reading, say) can swallow it."""


class StopSignals:
    """SIGINT and SIGTERM end the live view through the normal exit path (terminal restored).
    The first signal interrupts whatever is running; later ones only set the flag, so they cannot
    interrupt the restoring of the terminal. The loops also check the flag, in case the
    interruption was swallowed somewhere after all."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopSignals":
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)
        return self

    def handle(self, signum, frame):
        first = not self.requested
        self.requested = True
        if first:
            raise StopRequested()


def run_live(source: StatusSource, interval_s: float) -> int:
    stop = StopSignals().install()
    console = Console()
    try:
        if console.is_terminal:
            show_live(source, interval_s, console, stop)
        else:
            log_frames(source, interval_s, console, stop)
    except (StopRequested, KeyboardInterrupt):
        pass
    return 0


def show_live(source: StatusSource, interval_s: float, console: Console, stop: StopSignals) -> None:
    last = None
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as live:
        while not stop.requested:
            started = time.monotonic()
            frame, last = live_frame(source, last, console, interval_s)
            live.update(frame, refresh=True)
            pause(interval_s - (time.monotonic() - started), stop)


def log_frames(source: StatusSource, interval_s: float, console: Console, stop: StopSignals) -> None:
    # Output to a file or pipe cannot be redrawn in place: one frame after another instead.
    last = None
    while not stop.requested:
        started = time.monotonic()
        frame, last = live_frame(source, last, console, interval_s)
        console.print(frame)
        console.print()
        pause(interval_s - (time.monotonic() - started), stop)


def pause(seconds: float, stop: StopSignals) -> None:
    if seconds > 0 and not stop.requested:
        time.sleep(seconds)
