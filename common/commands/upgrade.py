"""btcfeed upgrade-check: may this host be stopped for an upgrade now, and will this code run on its data?

Run before `bin/btcfeed down && git pull && bin/setup && bin/btcfeed up`, and again after the pull (the
new code, the stack still down) before `up`. One line per check, then the verdict; exit 0 go, 1 go with
a warning, 2 no-go (a configuration error too, in one line).

  config        the configuration loads with this code
  stack         running (every program RUNNING), or stopped: the local Redis's data is then read from a
                copy of its files on disk, loaded by a redis-server of its own (the state dir is left as
                it is)
  schema        the local Redis's data format (keys.SCHEMA) is one this code reads
  writer        on the primary with an empty backlog: not in failover, draining or maintenance (what the
                backlog holds is not in the primary yet; let sync hand back first)
  sync          sync verified the primary against the local copy recently (btcfeed:sync:primary
                verified_ms): nothing the primary lacks is waiting to be re-sent
  bus           what the writer has not applied yet (pending and undelivered bus entries)
  backfill      per source: how long a stop the exchange's REST backfill fills, and how fast
  hosts         whether another feed host covers the stop
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote

import click
import redis

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.commands.stack import PROGRAMS, Stack
from btcfeed.exchanges import binance, coinbase, kraken
from btcfeed.storage import schema, writerstate
from btcfeed.storage.bus import connect_local
from btcfeed.storage.primary import connect_primary

OK, WARN, FAIL = "ok", "warn", "fail"
EXIT = {OK: 0, WARN: 1, FAIL: 2}
VERDICT = {OK: "go", WARN: "go with a warning", FAIL: "no-go"}
JSON_VERDICT = {OK: "go", WARN: "warn", FAIL: "no-go"}
SYNC_RECENT_S = 60.0            # sync compares every second; a minute without a verification is not normal
BUS_WARN_ENTRIES = 1000         # entries of up to 2,000 trades each: the writer is well behind
RATE_WINDOW_MINUTES = 5         # the source's recent rate: its last complete candle minutes in the primary
PRIMARY_TIMEOUT_MS = 2000
COPY_LOAD_WAIT_S = 120.0        # for the copy of the local Redis's data to load
EXAMPLE_STOP_S = 3600
HOSTS = ("single host: the primary keeps no record of the feed hosts that write it; while this one is "
         "stopped the exchange's REST backfill covers the stop (a second host writing the same primary "
         "would carry the live feed)")


class Check(dict):
    def __init__(self, name: str, status: str, detail: str, **extra):
        super().__init__(name=name, status=status, detail=detail, **extra)


def run(as_json: bool) -> int:
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        click.echo(f"btcfeed upgrade-check: configuration error: {exc}", err=True)
        return EXIT[FAIL]
    checks = [Check("config", OK, f"loads with this code ({len(cfg.sources)} source(s): "
                                  f"{', '.join(s.name for s in cfg.sources)}; state dir {cfg.state_dir})")]
    stack = Stack(cfg.state_dir)
    running = stack.is_running()
    checks.append(_stack_check(stack, running))
    with _LocalData(cfg, running) as local:
        if local.client is None:
            checks.append(Check("local", FAIL if running or local.error else WARN, local.note))
        else:
            checks += _local_checks(cfg, local.client, running)
    primary = _primary(cfg)
    checks += [_backfill_check(cfg, source, local.cursor_times.get(source.name), primary)
               for source in cfg.sources]
    checks.append(Check("hosts", OK, HOSTS))
    worst = max((c["status"] for c in checks), key=lambda s: EXIT[s])
    report = {"verdict": JSON_VERDICT[worst], "exit_code": EXIT[worst],
              "checks": checks}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for check in checks:
            click.echo(f"upgrade-check: {check['status']:<4} {check['name']}: {check['detail']}")
        click.echo(f"upgrade-check: {VERDICT[worst].upper()}")
    return EXIT[worst]


# --- the stack and its local Redis ---------------------------------------------------------------------

def _stack_check(stack: Stack, running: bool) -> Check:
    if not running:
        return Check("stack", OK, f"stopped (state dir {stack.state_dir}); the local Redis's data is read "
                                  "from a copy of its files")
    states = {p["name"]: p["statename"] for p in stack.processes()}
    wrong = {name: states.get(name, "absent") for name in PROGRAMS if states.get(name) != "RUNNING"}
    if wrong:
        return Check("stack", WARN, "running, but " + ", ".join(f"{n} {s}" for n, s in wrong.items()))
    return Check("stack", OK, f"running (supervisord pid {stack.supervisord_pid()}), every program RUNNING")


class _LocalData:
    """A client of the local Redis: the running one, or (the stack stopped, the local Redis supervised) a
    redis-server of our own on a copy of its data files."""

    def __init__(self, cfg, running: bool):
        self.cfg, self.running = cfg, running
        self.client, self.note, self.error = None, "", False
        self.server, self.copy = None, None
        self.cursor_times = {}

    def __enter__(self):
        # The supervised local Redis (no BTCFEED_LOCAL_URL) stops with the stack; its files are in the
        # state dir.
        supervised = self.cfg.local_url == f"unix://{quote(self.cfg.path('redis.sock'))}"
        try:
            client = connect_local(self.cfg.local_url, timeout_s=2)
            client.ping()
            self.client = client
        except redis.RedisError as exc:
            if self.running or not supervised:
                self.note = f"the local Redis does not answer ({type(exc).__name__}): see bin/health"
                self.error = True
            else:
                self._load_copy()
        if self.client is not None:
            for source in self.cfg.sources:
                value = self.client.hget(keys.source_stats(source.name), "cursor_ts")
                if value is not None and value.isdigit():
                    self.cursor_times[source.name] = int(value)
        return self

    def _load_copy(self) -> None:
        data = self.cfg.path("redis")
        if not os.path.isdir(data) or not os.listdir(data):
            self.note = f"no local data in {data}: the first `up` starts from nothing"
            return
        server = shutil.which("redis-server")
        if server is None:
            self.note, self.error = "redis-server is not on PATH: cannot read the local data on disk", True
            return
        self.copy = tempfile.mkdtemp(prefix="bf-upgrade-", dir="/tmp")
        shutil.copytree(data, os.path.join(self.copy, "redis"))
        sock = os.path.join(self.copy, "redis.sock")
        self.server = subprocess.Popen(
            [server, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700", "--dir",
             os.path.join(self.copy, "redis"), "--appendonly", "yes", "--save", "",
             "--aof-load-truncated", "yes", "--maxmemory", "0", "--auto-aof-rewrite-percentage", "0",
             "--logfile", os.path.join(self.copy, "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(unix_socket_path=sock, socket_timeout=10)
        deadline = time.monotonic() + COPY_LOAD_WAIT_S
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                client.ping()
                self.client = client
                return
            except redis.RedisError:
                time.sleep(0.1)
        self.note, self.error = f"a copy of {data} did not load (see {self.copy}/log)", True

    def __exit__(self, *exc):
        if self.server is not None:
            self.server.kill()
            self.server.wait(10)
        if self.copy is not None and not self.error:
            shutil.rmtree(self.copy, ignore_errors=True)
        return False


def _local_checks(cfg, local, running: bool) -> list:
    checks = []
    found = schema.recorded(local)
    problem = schema.problem(found)
    if problem:
        checks.append(Check("schema", FAIL, problem, found=found))
    elif found is None:
        checks.append(Check("schema", OK, f"none recorded (data from before versions: format "
                                          f"{schema.UNRECORDED}); this code reads it and records "
                                          f"{schema.VERSION} at the writer's start",
                            found=found))
    else:
        checks.append(Check("schema", OK, f"data format {found}; this code reads "
                                          f"{', '.join(map(str, schema.READABLE))}", found=found))
    checks.append(_writer_check(local))
    checks.append(_sync_check(cfg, local, running))
    checks.append(_bus_check(local))
    return checks


def _writer_check(local) -> Check:
    record = {k.decode(): v.decode() for k, v in local.hgetall(keys.WRITER_STATE).items()}
    state = record.get("state", writerstate.PRIMARY)
    backlog = local.xlen(keys.BACKLOG)
    if state == writerstate.MAINTENANCE:
        return Check("writer", FAIL, f"in maintenance ({record.get('reason', '')}): the primary is paused; "
                                     f"`btcfeed primary resume` and wait for the hand-back first "
                                     f"(backlog {backlog} entries)", state=state, backlog=backlog)
    if state != writerstate.PRIMARY:
        return Check("writer", FAIL, f"in {state} ({record.get('reason', '')}): {backlog} backlog entries "
                                     "are not in the primary yet; wait for sync's hand-back (bin/health)",
                     state=state, backlog=backlog)
    if backlog:
        return Check("writer", FAIL, f"on the primary but {backlog} backlog entries are left: wait for sync",
                     state=state, backlog=backlog)
    return Check("writer", OK, "on the primary, backlog empty", state=state, backlog=0)


def _newest_write_ms(cfg, local) -> int:
    """When the writer last wrote: the newest mirror entry of any source (stream ids are times)."""
    newest = 0
    for source in cfg.sources:
        entries = local.xrevrange(keys.mirror(source.name), count=1)
        if entries:
            newest = max(newest, int(entries[0][0].split(b"-")[0]))
    return newest


def _sync_check(cfg, local, running: bool) -> Check:
    verified_ms = int(local.hget(keys.SYNC_PRIMARY, "verified_ms") or 0)
    if not verified_ms:
        return Check("sync", WARN, "sync has never verified the primary against the local copy "
                                   "(see bin/sync-check)", verified_ms=0)
    if running:
        age_s = time.time() - verified_ms / 1000
        detail = f"verified the primary against the local copy {age_s:.1f}s ago"
    else:
        age_s = max(0.0, (_newest_write_ms(cfg, local) - verified_ms) / 1000)
        detail = f"verified the primary against the local copy {age_s:.1f}s before the writer's last batch"
    if age_s > SYNC_RECENT_S:
        return Check("sync", WARN, f"{detail} (more than {SYNC_RECENT_S:.0f}s): see bin/health and "
                                   "bin/sync-check", verified_ms=verified_ms)
    return Check("sync", OK, detail, verified_ms=verified_ms)


def _bus_check(local) -> Check:
    try:
        groups = {g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                  for g in local.xinfo_groups(keys.BUS)}
    except redis.ResponseError:
        return Check("bus", OK, "no bus yet", pending=0, lag=0)
    group = groups.get(keys.BUS_GROUP, {})
    pending, lag = int(group.get("pending") or 0), int(group.get("lag") or 0)
    detail = f"{pending} entries delivered and not acknowledged, {lag} not yet read by the writer"
    if pending + lag > BUS_WARN_ENTRIES:
        return Check("bus", WARN, f"{detail}: the writer is behind; they stay on the bus through the stop",
                     pending=pending, lag=lag)
    return Check("bus", OK, detail, pending=pending, lag=lag)


# --- backfill reach per source ------------------------------------------------------------------------

def _primary(cfg):
    try:
        client = connect_primary(cfg, PRIMARY_TIMEOUT_MS)
        client.ping()
        return client
    except (redis.RedisError, OSError, ValueError):
        return None


def _recent_rate(primary, source: str):
    """Trades per second over the source's last complete candle minutes in the primary, or None."""
    if primary is None:
        return None
    try:
        # The newest minute is still going on, and the oldest may have begun in its middle.
        oldest = primary.zrange(keys.candles_index(source), 0, 0)
        minutes = [int(m) for m in primary.zrevrange(keys.candles_index(source), 1, RATE_WINDOW_MINUTES)
                   if [m] != oldest]
        if not minutes:
            return None
        counts = [int(primary.hget(keys.candle(source, m), "n") or 0) for m in minutes]
    except redis.RedisError:
        return None
    return sum(counts) / (60.0 * len(minutes))


def _pages_per_minute(cfg, exchange: str):
    """(how many REST pages the backfill reads a minute under the exchange's limits, trades per page, how
    it pages)."""
    if exchange == "binance":
        endpoint = binance.REST_ENDPOINTS[cfg.binance_trade_kind]
        budget = binance.WEIGHT_LIMIT_PER_MINUTE * binance.WEIGHT_SAFE_FRACTION
        return budget // endpoint.weight, binance.REST_PAGE_LIMIT, f"{endpoint.path}?fromId= from the cursor"
    if exchange == "coinbase":
        return (coinbase.REST_PER_SECOND * 60, coinbase.REST_PAGE_LIMIT,
                "/products/{id}/trades?after= paged by trade id from the cursor")
    return (kraken.REST_PER_SECOND * 60, kraken.REST_PAGE_LIMIT,
            "/0/public/Trades?since= paged by time from the cursor's trade")


def _backfill_check(cfg, source, cursor_ts, primary) -> Check:
    pages, page_size, how = _pages_per_minute(cfg, source.exchange)
    retention_h = cfg.retention_hours
    if source.exchange == "kraken" and cursor_ts is None:
        search_h = kraken.SEARCH_MAX_LOOKBACK_S / 3600
        reach = (f"the time of the cursor's trade is not recorded, so the start is searched back at most "
                 f"{search_h / 24:g} days: a stop up to {min(retention_h, search_h):g} h (the shorter of "
                 "that and the retention window)")
    else:
        reach = (f"the exchange keeps its history, so any stop up to the retention window "
                 f"({retention_h:g} h; older trades are trimmed from the primary as they land)")
    detail = (f"REST {how}: {reach} is filled, {pages:,.0f} pages of {page_size:,} trades a minute "
              "under the exchange's limits")
    extra = {"pages_per_minute": pages, "retention_hours": retention_h}
    rate = _recent_rate(primary, source.name)
    if rate:
        needed = math.ceil(EXAMPLE_STOP_S * rate / page_size)
        takes = "within the first minute" if needed <= pages else f"about {needed / pages:.0f} minutes"
        detail += (f"; at the recent {rate:,.0f} trades/s a {EXAMPLE_STOP_S // 60}-minute stop is "
                   f"{needed:,} pages, {takes}")
        extra["recent_trades_per_s"] = round(rate, 1)
    return Check(f"backfill {source.name}", OK, detail, **extra)


@click.command("upgrade-check")
@click.option("--json", "as_json", is_flag=True, help="Print the result as a JSON document.")
def upgrade_check(as_json):
    """Pre-flight of an upgrade (before `down`, and after the pull before `up`): one line per check;
    exit 0 go, 1 go with a warning, 2 no-go (a configuration error too)."""
    sys.exit(run(as_json))
