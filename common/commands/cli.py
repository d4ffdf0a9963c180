"""btcfeed's command line: every command in one click application.

bin/btcfeed runs the group (`btcfeed up|down|status|logs|health|monitor|sync-check|demo|bench…|chaos|
version`); bin/health, bin/monitor and bin/sync-check run one of its subcommands on its own
(main(command=...)), so a command has one definition, the options shared between commands are defined
once, and the exit codes agree: a configuration error is 2 everywhere; health and sync-check keep the
Nagios codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), a usage error included, which is UNKNOWN there.
"""

import importlib
import json
import math
import os
import re
import sys
import time
from importlib import metadata

import click
from supervisor.http import NOT_DONE_YET, tail_f_producer

from btcfeed import config as config_module
from btcfeed.commands.maintenance import primary
from btcfeed.commands.stack import PROGRAMS, Stack, StackError
from btcfeed.commands.upgrade import upgrade_check
from btcfeed.observability.status import Thresholds, exit_code

PACKAGE = "btcfeed"
CONFIG_ERROR = 2
NAGIOS_UNKNOWN = 3
CONTEXT = {"help_option_names": ["-h", "--help"]}
FOLLOW_PAUSE_S = 0.2
# The last lines are looked for in this much of the end of a log (supervisord rotates them at 10 MB).
TAIL_WINDOW_BYTES = 1 << 20


# --- options shared between commands (one definition each) ----------------------------------------

class Seconds(click.ParamType):
    """A positive, finite number of seconds (click.FloatRange would let inf and nan through)."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (number > 0 and math.isfinite(number)):
            self.fail(f"not a positive number of seconds: {value!r}", param, ctx)
        return number


def _http_url(ctx, param, value):
    if value is not None and not re.match(r"^https?://", value):
        raise click.BadParameter(f"must be an http:// or https:// URL, got {value!r}", ctx, param)
    return value


SHARED_OPTIONS = {
    "url": click.option("--url", default=None, metavar="URL", callback=_http_url,
                        help="Status URL of the health API (default http://BTCFEED_HEALTH_ADDR/status)."),
    "token_file": click.option("--token-file", default=None, metavar="PATH",
                               help="File holding the health API's bearer token "
                                    "(default: BTCFEED_HEALTH_TOKEN or BTCFEED_HEALTH_TOKEN_FILE)."),
    "timeout": click.option("--timeout", default=2.0, show_default=True, type=Seconds(),
                            help="Seconds to wait for an answer from the health API."),
    "json": click.option("--json", "as_json", is_flag=True, help="Print the result as a JSON document."),
}


def shared(*names):
    """The shared options by name, in the order given (as they appear in --help)."""
    def decorate(function):
        for name in reversed(names):
            function = SHARED_OPTIONS[name](function)
        return function
    return decorate


# --- configuration and failures --------------------------------------------------------------------

def read_settings(token_file=None):
    """The configuration and the health API's token: --token-file over the configured one."""
    cfg = config_module.load()
    return cfg, (read_token_file(token_file) if token_file else cfg.health_token)


def read_token_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except OSError as exc:
        raise config_module.ConfigError(f"--token-file: cannot read {path!r}: {exc.strerror}")
    except UnicodeDecodeError:
        raise config_module.ConfigError(f"--token-file: {path!r} is not text")
    if not token:
        raise config_module.ConfigError(f"--token-file: {path!r} is empty")
    return token


class ConfigProblem(click.ClickException):
    """A wrong setting: one line on stderr and exit 2, as the processes do."""

    exit_code = CONFIG_ERROR

    def show(self, file=None):
        click.echo(f"btcfeed: configuration error: {self.message}", err=True)


class Failure(click.ClickException):
    """A command that could not do its work: one line on stderr (whatever the cause said), exit 1."""

    def show(self, file=None):
        click.echo(f"btcfeed: {' '.join(self.message.split())}", err=True)


def settings(token_file=None):
    try:
        return read_settings(token_file)
    except config_module.ConfigError as exc:
        raise ConfigProblem(str(exc))


# --- command classes -------------------------------------------------------------------------------

class Command(click.Command):
    """-h as well as --help, also when a command runs on its own (bin/health)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("context_settings", CONTEXT)
        super().__init__(*args, **kwargs)


class NagiosUsageError(click.ClickException):
    exit_code = NAGIOS_UNKNOWN

    def show(self, file=None):
        click.echo(self.message)


class NagiosCommand(Command):
    """health and sync-check are read by monitoring systems, which take click's usage exit code 2 for
    CRITICAL: a usage error is UNKNOWN (3), said on stdout where the status line is read."""

    def __init__(self, *args, usage_line: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_line = usage_line

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise NagiosUsageError(self.usage_line.format(exc.format_message()))


class Group(click.Group):
    command_class = Command


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name=PACKAGE, prog_name=PACKAGE, message="%(prog)s %(version)s")
def cli():
    """btcfeed: exchange trades into your Redis, exactly once."""


@cli.command()
def version():
    """Print btcfeed's version (from the installed package)."""
    click.echo(f"{PACKAGE} {metadata.version(PACKAGE)}")


# --- the stack -------------------------------------------------------------------------------------

@cli.command()
@click.option("--wait", default=30.0, show_default=True, type=Seconds(),
              help="Seconds to wait for every process to run.")
def up(wait):
    """Start the supervised stack in the background."""
    cfg, _ = settings()
    try:
        Stack(cfg.state_dir).up(wait)
    except StackError as exc:
        raise Failure(f"up failed: {exc}")
    except OSError as exc:
        raise Failure(f"up failed: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    click.echo(f"btcfeed is up (state dir {cfg.state_dir}); `btcfeed status` shows it")


@cli.command()
def down():
    """Stop the stack and supervisord."""
    cfg, _ = settings()
    stack = Stack(cfg.state_dir)
    if stack.supervisord_pid() is None:
        click.echo("btcfeed is not running")
        return
    try:
        stack.down()
    except StackError as exc:
        raise Failure(f"down failed: {exc}")
    click.echo("btcfeed is down")


@cli.command()
@shared("url", "token_file", "timeout", "json")
def status(url, token_file, timeout, as_json):
    """The supervised processes and the health verdict: exit 0 ok, 1 degraded, 2 critical,
    3 not running or no answer from the health API."""
    from btcfeed.commands import healthcheck
    cfg, token = settings(token_file)
    stack = Stack(cfg.state_dir)
    report = {"state_dir": cfg.state_dir, "running": stack.is_running(), "processes": [], "health": None,
              "note": None}
    if report["running"]:
        report["processes"] = [{key: p[key] for key in ("name", "statename", "description")}
                               for p in stack.processes()]
        url = url or healthcheck.status_url(cfg)
        report["health"], report["note"] = healthcheck.read_verdict(cfg, url, token, timeout)
    verdict = report["health"]
    report["exit_code"] = NAGIOS_UNKNOWN if verdict is None else exit_code(verdict["status"])
    click.echo(json.dumps(report) if as_json else status_text(report))
    sys.exit(report["exit_code"])


def status_text(report: dict) -> str:
    if not report["running"]:
        return f"btcfeed is not running (state dir {report['state_dir']})"
    lines = [f"{p['name']:<12} {p['statename']:<9} {p['description']}" for p in report["processes"]]
    verdict = report["health"]
    if verdict is None:
        return "\n".join(lines + [f"health: {report['note']}"])
    reasons = [f"  - {reason}" for reason in verdict.get("reasons", [])]
    return "\n".join(lines + [f"health: {verdict['status']}"] + reasons)


@cli.command()
@click.argument("name", type=click.Choice(PROGRAMS + ("supervisord",)))
@click.option("-f", "--follow", is_flag=True,
              help="Keep printing new lines, across supervisord's log rotation.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(min=0),
              help="How many of the last lines to print first.")
def logs(name, follow, lines):
    """Print the log of one process (or of supervisord itself)."""
    cfg, _ = settings()
    path = Stack(cfg.state_dir).log_path(name)
    if not os.path.exists(path):
        raise Failure(f"no log yet at {path}")
    # The follower is opened first, so that no line falls between the last lines and the following.
    follower = LogFollower(path) if follow else None
    out = sys.stdout.buffer
    try:
        write(out, last_lines(path, lines, os.path.getsize(path) if follower is None else follower.sz))
        while follower is not None:
            chunk = follower.read_new()
            if chunk:
                write(out, chunk)
            else:
                time.sleep(FOLLOW_PAUSE_S)
    except KeyboardInterrupt:
        pass   # Ctrl-C is how a follow ends
    except BrokenPipeError:
        # The reader went away (`| head`): not an error, and nothing more can be written.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())


def write(out, data: bytes) -> None:
    out.write(data)
    out.flush()


def last_lines(path: str, count: int, upto: int) -> bytes:
    """The last `count` lines of the first `upto` bytes of the file."""
    start = max(0, upto - TAIL_WINDOW_BYTES)
    with open(path, "rb") as handle:
        handle.seek(start)
        found = handle.read(upto - start).splitlines(keepends=True)
    if start > 0:
        found = found[1:]   # the window began inside a line
    return b"".join(found[-count:] if count else [])


class _NoRequest:
    """tail_f_producer keeps a weak reference to the HTTP request it answers; here there is none."""


class LogFollower(tail_f_producer):
    """supervisor's own follower (what `supervisorctl tail -f` streams), read in this process, so it works
    with supervisord stopped too. It reopens the log when the path holds a new file, as after
    supervisord's rotation (NAME.log renamed to NAME.log.1, a new NAME.log). The rest of the old file is
    read first: supervisor's producer alone would skip the lines written just before the rotation."""

    def __init__(self, path: str):
        self.left_over = b""
        self._request = _NoRequest()
        super().__init__(self._request, path, 0)

    def _follow(self):
        try:
            rotated = os.stat(self.filename).st_ino != self.ino
        except OSError:
            return   # renamed away and no new file yet: the old one is still the one written
        if rotated:
            self.file.seek(self.sz)
            self.left_over += self.file.read()
        super()._follow()

    def read_new(self) -> bytes:
        chunk = self.more()
        if chunk is NOT_DONE_YET:
            chunk = b""
        elif isinstance(chunk, str):
            chunk = chunk.encode()
        rest, self.left_over = self.left_over, b""
        return rest + chunk


# --- health, monitor, sync-check -------------------------------------------------------------------

@cli.command(cls=NagiosCommand, usage_line="btcfeed UNKNOWN: usage: {} (see --help)")
@shared("url", "token_file", "timeout", "json")
@click.option("--trade-age-warn", default=Thresholds.trade_age_warn_s, show_default=True,
              help="Seconds without a trade from a source before WARNING.")
@click.option("--trade-age-crit", default=Thresholds.trade_age_crit_s, show_default=True,
              help="Seconds without a trade from a source before CRITICAL.")
@click.option("--backlog-warn", default=Thresholds.backlog_warn, show_default=True,
              help="Trades in the backlog before WARNING.")
@click.option("--backlog-crit", default=Thresholds.backlog_crit, show_default=True,
              help="Trades in the backlog before CRITICAL.")
@click.option("--failover-warn", default=Thresholds.failover_warn_s, show_default=True,
              help="Seconds in failover before WARNING (0: any failover).")
@click.option("--failover-crit", default=Thresholds.failover_crit_s, show_default=True,
              help="Seconds in failover before CRITICAL.")
def health(url, token_file, timeout, as_json, trade_age_warn, trade_age_crit, backlog_warn, backlog_crit,
           failover_warn, failover_crit):
    """Is every trade flowing? A summary (or the JSON document) and a Nagios exit code:
    0 OK, 1 WARNING, 2 CRITICAL (a configuration error too), 3 UNKNOWN (a usage error too).

    It reads the health API's /status; when that does not answer, the local Redis, the primary and
    supervisor directly, and says so."""
    from btcfeed.commands import healthcheck
    try:
        cfg, token = read_settings(token_file)
    except config_module.ConfigError as exc:
        sys.exit(healthcheck.configuration_error(str(exc), as_json))
    thresholds = Thresholds(trade_age_warn, trade_age_crit, backlog_warn, backlog_crit,
                            failover_warn, failover_crit)
    sys.exit(healthcheck.run(cfg, url or healthcheck.status_url(cfg), token, timeout, thresholds, as_json))


@cli.command()
@shared("url", "token_file", "timeout")
@click.option("--interval", default=1.0, show_default=True, type=Seconds(), help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (3 when nothing could be read).")
def monitor(url, token_file, timeout, interval, once):
    """Live terminal dashboard of the health API's GET /status (read from Redis and supervisor
    directly while the API does not answer). Ctrl-C quits."""
    from btcfeed.commands import healthcheck
    from btcfeed.commands import monitor as dashboard
    cfg, token = settings(token_file)
    source = dashboard.StatusSource(url or healthcheck.status_url(cfg), token, cfg, timeout)
    sys.exit(dashboard.show_once(source) if once else dashboard.run_live(source, interval))


@cli.command("sync-check", cls=NagiosCommand, usage_line="SYNC-CHECK UNKNOWN - usage: {} (see --help)")
@click.option("--repair", is_flag=True,
              help="Re-send the trades missing from the primary from the local copy, through the idempotent "
                   "apply under the primary's epoch, then check again.")
@shared("json")
def sync_check(repair, as_json):
    """Compare the local copy with the primary Redis: the held index with the primary's seen-set (as sync
    does; trades missing from the primary), and both trade streams over the retention window (duplicates,
    entries lost although marked applied, per-minute counts, last ids). Exit 0 OK, 1 WARNING,
    2 CRITICAL (a configuration error too), 3 UNKNOWN (a usage error too)."""
    from btcfeed.commands import synccheck
    sys.exit(synccheck.run(repair, as_json))


# --- demo, benchmarks, chaos (from a checkout: tools/ is not installed) ----------------------------

def tool(module: str, name: str):
    """A function of tools/ (the simulator, benches, chaos, demo), or one readable line when this is an
    installed package without them."""
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("tools"):
            raise
        click.echo("btcfeed: the demo, the benchmarks and chaos run from a checkout of btcfeed "
                   "(tools/ is not part of the installed package)", err=True)
        sys.exit(2)


@cli.command()
@click.option("--seconds", default=20, show_default=True, help="How long to watch the live feed.")
@click.option("--rate", default=200, show_default=True, help="Simulated trades per second.")
def demo(seconds, rate):
    """Offline demo: exchange simulator + stand-in primary + the real stack."""
    run_demo = tool("tools.demo", "run_demo")
    sys.exit(run_demo(seconds=seconds, rate=rate, echo=click.echo))


@cli.command()
@click.option("--seconds", default=15, show_default=True, help="Length of the sustained-throughput run.")
@click.option("--rate", default=100_000, show_default=True, help="Simulator rate for the throughput run.")
def bench(seconds, rate):
    """Throughput, latency and memory of the real stack, against redis-benchmark in the same run."""
    run_bench = tool("tools.bench.throughput", "run_bench")
    sys.exit(run_bench(seconds=seconds, rate=rate, echo=click.echo))


@cli.command("bench-failover")
@click.option("--seconds", default=4.0, show_default=True, help="Length of each primary outage.")
@click.option("--rate", default=2000, show_default=True, help="Simulated trades per second during the run.")
def bench_failover(seconds, rate):
    """Failover window, replay rate and hand-back, side by side with redis-py's MultiDBClient."""
    run_failover_bench = tool("tools.bench.failover", "run_failover_bench")
    sys.exit(run_failover_bench(outage_s=seconds, rate=rate, echo=click.echo))


@cli.command("bench-reseed")
@click.option("--trades", default=5_000_000, show_default=True,
              help="Trades in the local copy before the loss.")
@click.option("--rate", default=1000, show_default=True, help="Live trades per second meanwhile.")
def bench_reseed(trades, rate):
    """A primary back empty under a full local copy: first live trade, re-seed time and rate."""
    run_reseed_bench = tool("tools.bench.reseed", "run_reseed_bench")
    sys.exit(run_reseed_bench(trades=trades, rate=rate, echo=click.echo))


@cli.command("bench-cost")
@click.option("--rates", default="0,300,1000,10000", show_default=True,
              help="Trades per second, one phase each.")
@click.option("--window", default=30.0, show_default=True,
              help="Seconds measured per phase (after a warm-up).")
@click.option("--linger-ms", type=click.IntRange(0, 1000), default=None,
              help="BTCFEED_LINGER_MS for the stack (default: the product's default).")
def bench_cost(rates, window, linger_ms):
    """CPU of every process and both Redis servers at idle and at real rates, and RSS."""
    run_cost_bench = tool("tools.bench.cost", "run_cost_bench")
    sys.exit(run_cost_bench(rates=[float(r) for r in rates.split(",")], window_s=window, linger_ms=linger_ms,
                            echo=click.echo))


@cli.command("bench-memory")
@click.option("--rates", default="300,1000", show_default=True,
              help="Trades per second, one phase each (on the primary, then an outage).")
@click.option("--window", default=30.0, show_default=True,
              help="Seconds measured on the primary, and again through the outage, per rate.")
def bench_memory(rates, window):
    """The local Redis's bytes a trade on the primary (mirror, read view) and through a primary outage
    (failover copy, backlog, read view)."""
    run_memory_bench = tool("tools.bench.memory", "run_memory_bench")
    sys.exit(run_memory_bench(rates=[float(r) for r in rates.split(",")], window_s=window, echo=click.echo))


@cli.command("bench-move")
@click.option("--trades", default=2_000_000, show_default=True, help="Trades in the window to move.")
@click.option("--rate", default=1000, show_default=True, help="Live trades per second meanwhile.")
def bench_move(trades, rate):
    """`btcfeed primary move` of a full window with the feed on: duration, pause, exactness."""
    run_move_bench = tool("tools.bench.move", "run_move_bench")
    sys.exit(run_move_bench(trades=trades, rate=rate, echo=click.echo))


@cli.command("bench-primary")
def bench_primary():
    """The write path into a primary over plain TCP and TLS, and into a Redis Cluster (sources on one
    master or spread over three), in one run."""
    run_primary_bench = tool("tools.bench.primary", "run_primary_bench")
    sys.exit(run_primary_bench(echo=click.echo))


@cli.command("bench-backfill")
def bench_backfill():
    """Backfill rate after a long ingest outage (live trades flowing beside it) and the time from a
    dropped connection to the gap being filled."""
    run_backfill_bench = tool("tools.bench.backfill", "run_backfill_bench")
    sys.exit(run_backfill_bench(echo=click.echo))


@cli.command("bench-apply")
@click.option("--runs", default=3, show_default=True, help="Runs of every case, taken in turn (medians).")
@click.option("--compare-with", "variant", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A variant of the apply script: paired runs against the product's, same data checked.")
@click.option("--batch", default=2000, show_default=True, type=click.IntRange(1, 2000),
              help="With --compare-with: trades per batch (under 100: one batch per round trip, as the "
                   "writer at real rates).")
def bench_apply(runs, variant, batch):
    """The primary's CPU per applied trade (the apply script alone), against pipelined XADD, same run."""
    if variant:
        compare_scripts = tool("tools.bench.apply", "compare_scripts")
        sys.exit(compare_scripts(variant, echo=click.echo, runs=runs, batch=batch))
    run_apply_bench = tool("tools.bench.apply", "run_apply_bench")
    sys.exit(run_apply_bench(echo=click.echo, runs=runs))


@cli.command("bench-health")
def bench_health():
    """GET /status answer times under 100 requests/s while the feed runs, and the feed's slowdown."""
    run_health_bench = tool("tools.bench.health", "run_health_bench")
    sys.exit(run_health_bench(echo=click.echo))


@cli.command("bench-stream")
def bench_stream():
    """GET /v1/stream to one client flat out and to 20 live clients, and the feed's rate beside them."""
    run_stream_bench = tool("tools.bench.stream", "run_stream_bench")
    sys.exit(run_stream_bench(echo=click.echo))


@cli.command("bench-availability")
@click.option("--scale", default=1.0, show_default=True,
              help="Multiplies every phase of the schedule (0.2 for a quick run).")
@click.option("--price-stale-ms", type=int, default=None,
              help="BTCFEED_PRICE_STALE_MS for the stack (default: the product's default).")
@click.option("--keep", is_flag=True, help="Keep the state directory (logs, consumers' logs) after the run.")
@click.option("--hosts", type=click.IntRange(1, 2), default=1, show_default=True,
              help="Feed hosts feeding the primary; with 2 the consumers know both and host A is also "
                   "lost whole.")
def bench_availability(scale, price_stale_ms, keep, hosts):
    """What consumers see (the Python client, an SSE reader, a naive reader of the primary) through
    primary, exchange and process faults: fresh 100 ms slots, longest stale stretch, missing, duplicated."""
    run_availability_bench = tool("tools.bench.availability", "run_availability_bench")
    sys.exit(run_availability_bench(scale=scale, price_stale_ms=price_stale_ms, keep=keep, hosts=hosts,
                                    echo=click.echo))


@cli.command("bench-parse")
@click.option("--messages", default=200_000, show_default=True, help="Trade messages per run.")
@click.option("--runs", default=5, show_default=True, help="Runs per figure (the median is printed).")
@click.option("--form", "forms", multiple=True, type=click.Choice(["raw", "combined", "ndjson"]),
              help="Message forms to measure (default: all).")
def bench_parse(messages, runs, forms):
    """Frame reassembly and Binance parsing on one core, in messages/s against the 200,000/s target."""
    run_parse_bench = tool("tools.bench.parse", "run_parse_bench")
    every_form = tool("tools.bench.parse", "FORMS")
    sys.exit(run_parse_bench(n=messages, runs=runs, forms=forms or every_form, echo=click.echo))


@cli.command()
@click.option("--minutes", default=5.0, show_default=True, help="How long to keep injecting faults.")
@click.option("--seed", default=1, show_default=True,
              help="Seed of the fault schedule (same seed, same faults).")
@click.option("--rate", default=1000, show_default=True, help="Simulated trades per second.")
def chaos(minutes, seed, rate):
    """Randomized fault soak: prints trades expected / present / missing / duplicated."""
    run_chaos = tool("tools.chaos", "run_chaos")
    sys.exit(run_chaos(minutes=minutes, seed=seed, rate=rate, echo=click.echo))


cli.add_command(primary)
cli.add_command(upgrade_check)


def main(argv=None, command: str = None):
    """Run the whole command line, or one subcommand on its own under its own name (bin/health runs
    main(command="health")); exits with the command's code."""
    if command is None:
        cli.main(args=argv, prog_name=PACKAGE)
    else:
        cli.commands[command].main(args=argv, prog_name=command)


if __name__ == "__main__":
    main()
