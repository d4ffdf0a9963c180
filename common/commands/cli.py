"""bin/btcfeed: up | down | status | logs NAME | demo | bench | bench-failover | chaos — a thin CLI."""

import json
import os
import sys
import time
import urllib.error
import urllib.request

import click

from btcfeed import config as config_module
from btcfeed.commands.stack import PROGRAMS, Stack, StackError


def load_config():
    try:
        return config_module.load()
    except config_module.ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}")


def stack_for(cfg) -> Stack:
    return Stack(cfg.state_dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """btcfeed: exchange trades into your Redis, exactly once."""


@cli.command()
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for every process to run.")
def up(wait):
    """Start the supervised stack in the background."""
    cfg = load_config()
    stack = stack_for(cfg)
    try:
        stack.up(wait)
    except StackError as exc:
        raise click.ClickException(str(exc))
    click.echo(f"btcfeed is up (state dir {cfg.state_dir}); `bin/btcfeed status` shows it")


@cli.command()
def down():
    """Stop the stack and supervisord."""
    cfg = load_config()
    stack = stack_for(cfg)
    if stack.supervisord_pid() is None:
        click.echo("btcfeed is not running")
        return
    try:
        stack.down()
    except StackError as exc:
        raise click.ClickException(str(exc))
    click.echo("btcfeed is down")


@cli.command()
def status():
    """Processes and the health summary."""
    cfg = load_config()
    stack = stack_for(cfg)
    if not stack.is_running():
        click.echo(f"btcfeed is not running (state dir {cfg.state_dir})")
        sys.exit(3)
    for process in stack.processes():
        click.echo(f"{process['name']:<12} {process['statename']:<9} {process['description']}")
    document = fetch_health(cfg)
    if document is None:
        click.echo(f"health: no answer on {cfg.health_host}:{cfg.health_port}")
        sys.exit(3)
    click.echo(f"health: {document['status']}" + "".join(f"\n  - {r}" for r in document.get("reasons", [])))
    sys.exit({"ok": 0, "degraded": 1}.get(document["status"], 2))


def fetch_health(cfg, timeout_s: float = 2.0):
    url = f"http://{cfg.health_host}:{cfg.health_port}/health"
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {cfg.health_token}"} if cfg.health_token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())
    except (OSError, ValueError):
        return None


@cli.command()
@click.argument("name", type=click.Choice(PROGRAMS + ("supervisord",)))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True)
def logs(name, follow, lines):
    """Print the log of one process."""
    cfg = load_config()
    path = os.path.join(cfg.state_dir, "logs", f"{name}.log")
    if not os.path.exists(path):
        raise click.ClickException(f"no log yet at {path}")
    with open(path, "rb") as handle:
        tail = handle.readlines()[-lines:]
        sys.stdout.write(b"".join(tail).decode("utf-8", "replace"))
        sys.stdout.flush()
        while follow:
            line = handle.readline()
            if line:
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.2)


@cli.command()
@click.option("--seconds", default=20, show_default=True, help="How long to watch the live feed.")
@click.option("--rate", default=200, show_default=True, help="Simulated trades per second.")
def demo(seconds, rate):
    """Offline demo: exchange simulator + stand-in primary + the real stack."""
    from tools.demo import run_demo
    sys.exit(run_demo(seconds=seconds, rate=rate, echo=click.echo))


@cli.command()
@click.option("--seconds", default=15, show_default=True, help="Length of the sustained-throughput run.")
@click.option("--rate", default=100_000, show_default=True, help="Simulator rate for the throughput run.")
def bench(seconds, rate):
    """Throughput, latency and memory of the real stack, against redis-benchmark in the same run."""
    from tools.bench.throughput import run_bench
    sys.exit(run_bench(seconds=seconds, rate=rate, echo=click.echo))


@cli.command("bench-failover")
@click.option("--seconds", default=4.0, show_default=True, help="Length of each primary outage.")
@click.option("--rate", default=2000, show_default=True, help="Simulated trades per second during the run.")
def bench_failover(seconds, rate):
    """Failover window, replay rate and hand-back, side by side with redis-py's MultiDBClient."""
    from tools.bench.failover import run_failover_bench
    sys.exit(run_failover_bench(outage_s=seconds, rate=rate, echo=click.echo))


@cli.command("bench-reseed")
@click.option("--trades", default=5_000_000, show_default=True, help="Trades in the local copy before the loss.")
@click.option("--rate", default=1000, show_default=True, help="Live trades per second meanwhile.")
def bench_reseed(trades, rate):
    """A primary back empty under a full local copy: first live trade, re-seed time and rate."""
    from tools.bench.reseed import run_reseed_bench
    sys.exit(run_reseed_bench(trades=trades, rate=rate, echo=click.echo))


@cli.command("bench-primary")
def bench_primary():
    """The write path into a primary over plain TCP and TLS, and into a Redis Cluster (sources on one
    master or spread over three), in one run."""
    from tools.bench.primary import run_primary_bench
    sys.exit(run_primary_bench(echo=click.echo))


@cli.command("bench-backfill")
def bench_backfill():
    """Backfill rate after a long ingest outage (live trades flowing beside it) and the time from a
    dropped connection to the gap being filled."""
    from tools.bench.backfill import run_backfill_bench
    sys.exit(run_backfill_bench(echo=click.echo))


@cli.command("bench-health")
def bench_health():
    """GET /status answer times under 100 requests/s while the feed runs, and the feed's slowdown."""
    from tools.bench.health import run_health_bench
    sys.exit(run_health_bench(echo=click.echo))


@cli.command("bench-parse")
@click.option("--messages", default=200_000, show_default=True, help="Trade messages per run.")
@click.option("--runs", default=5, show_default=True, help="Runs per figure (the median is printed).")
@click.option("--form", "forms", multiple=True, type=click.Choice(["raw", "combined", "ndjson"]),
              help="Message forms to measure (default: all).")
def bench_parse(messages, runs, forms):
    """Frame reassembly and Binance parsing on one core, in messages/s against the 200,000/s target."""
    from tools.bench.parse import FORMS, run_parse_bench
    sys.exit(run_parse_bench(n=messages, runs=runs, forms=forms or FORMS, echo=click.echo))


@cli.command()
@click.option("--minutes", default=5.0, show_default=True, help="How long to keep injecting faults.")
@click.option("--seed", default=1, show_default=True, help="Seed of the fault schedule (same seed, same faults).")
@click.option("--rate", default=1000, show_default=True, help="Simulated trades per second.")
def chaos(minutes, seed, rate):
    """Randomized fault soak: prints trades expected / present / missing / duplicated."""
    from tools.chaos import run_chaos
    sys.exit(run_chaos(minutes=minutes, seed=seed, rate=rate, echo=click.echo))


def main():
    cli(prog_name="btcfeed")


if __name__ == "__main__":
    main()
