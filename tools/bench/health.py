"""bin/btcfeed bench-health: how fast GET /status answers under load, and what that load costs
the feed, measured in one run.

The simulator offers RATE trades/s to the real stack. Quiet rounds (no API load) alternate with
loaded rounds (REQUESTS_PER_S requests to /status, each on a new connection as a scraper makes
them); each round measures the rate landed in the primary and the end-to-end latency seen by a
live-channel subscriber. Alternating keeps slow drifts of a shared machine out of the comparison.
"""

import statistics
import threading
import time
import urllib.request
import xmlrpc.client

import orjson
import psutil
import redis

from btcfeed import keys
from tools.bench.throughput import LiveListener, percentiles
from btcfeed.commands.stack import StackError
from tools.rig import SimulatedStack
from tools.simulator import SimulatorError

SOURCE = "binance:BTCUSDT"
RATE = 10_000
REQUESTS_PER_S = 100
ROUND_S = 10.0
ROUNDS = 2                      # of each kind, alternating
WARMUP_S = 3.0
TARGET_STATUS_P99_MS = 50.0
TARGET_SLOWDOWN_PCT = 5.0
TARGET_HEALTH_RSS_MB = 60.0


class StatusLoad(threading.Thread):
    """GET /status at a fixed pace; records every answer's time (ms) and any failure."""

    def __init__(self, url: str, per_second: float, seconds: float):
        super().__init__(name="status-load", daemon=True)
        self.url, self.interval, self.seconds = url, 1.0 / per_second, seconds
        self.times_ms, self.failures = [], 0

    def run(self) -> None:
        started = next_at = time.monotonic()
        while time.monotonic() - started < self.seconds:
            begin = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    response.read()
                self.times_ms.append((time.perf_counter() - begin) * 1000)
            except OSError:
                self.failures += 1
            next_at += self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def measure_round(rig, health_url: str, loaded: bool, health_proc: psutil.Process) -> dict:
    """One round: landed rate, end-to-end latency, and (loaded) the /status answer times."""
    listener = LiveListener(redis.Redis(host="127.0.0.1", port=rig.primary_server.port, socket_timeout=None))
    listener.subscribe()
    listener.start()
    load = StatusLoad(health_url, REQUESTS_PER_S, ROUND_S) if loaded else None
    cpu_before = health_proc.cpu_times()
    first_id, started = _primary_last_id(rig), time.monotonic()
    if load:
        load.start()
    peak_rss = 0.0
    while time.monotonic() - started < ROUND_S:
        peak_rss = max(peak_rss, health_proc.memory_info().rss / 2**20)
        time.sleep(0.2)
    elapsed = time.monotonic() - started
    landed = (_primary_last_id(rig) - first_id) / elapsed
    if load:
        load.join(10)
    listener.close()
    cpu_after = health_proc.cpu_times()
    latencies = [arrived - _ts(payload) for arrived, payload in listener.received]
    return {"loaded": loaded, "landed": landed, "latency": percentiles(latencies),
            "status_ms": percentiles(load.times_ms) if load else None,
            "requests": len(load.times_ms) if load else 0, "failures": load.failures if load else 0,
            "health_cpu_pct": 100 * ((cpu_after.user + cpu_after.system)
                                     - (cpu_before.user + cpu_before.system)) / elapsed,
            "health_rss_mb": peak_rss}


def _ts(payload: bytes) -> float:
    return orjson.loads(payload)["ts"]


def _primary_last_id(rig) -> int:
    value = rig.primary.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else 0


def run_health_bench(echo=print) -> int:
    rig = SimulatedStack("bf-hbench-")
    ok = False
    try:
        rig.start_primary()
        rig.start_simulator(RATE, max_send_buffer=1 << 30)
        echo(f"bench-health: starting the stack; simulator at {RATE:,} trades/s ...")
        rig.start_stack(connect_timeout_s=20)
        health_url = f"http://{rig.stack.env['BTCFEED_HEALTH_ADDR']}/status"
        health_proc = psutil.Process(rig.stack.info("health")["pid"])
        rig.sim.resume()
        time.sleep(WARMUP_S)
        rounds = []
        for index in range(ROUNDS * 2):
            loaded = index % 2 == 1
            echo(f"bench-health: round {index + 1}/{ROUNDS * 2}: {'with' if loaded else 'without'} "
                 f"{REQUESTS_PER_S} GET /status per second for {ROUND_S:g} s ...")
            rounds.append(measure_round(rig, health_url, loaded, health_proc))
        ok = True
    except (StackError, SimulatorError, redis.RedisError, OSError, xmlrpc.client.Error) as exc:
        echo(f"bench-health: could not run: {type(exc).__name__}: {exc}")
        return 1
    finally:
        rig.close(keep=not ok)
    report(echo, rounds)
    return 0


def report(echo, rounds) -> None:
    quiet = [r for r in rounds if not r["loaded"]]
    loaded = [r for r in rounds if r["loaded"]]
    all_p99 = max(r["status_ms"]["p99"] for r in loaded)
    requests = sum(r["requests"] for r in loaded)
    failures = sum(r["failures"] for r in loaded)
    landed_quiet = statistics.median(r["landed"] for r in quiet)
    landed_loaded = statistics.median(r["landed"] for r in loaded)
    slowdown = 100 * (landed_quiet - landed_loaded) / landed_quiet if landed_quiet else 0.0
    p99_quiet = statistics.median(r["latency"]["p99"] for r in quiet)
    p99_loaded = statistics.median(r["latency"]["p99"] for r in loaded)
    rss = max(r["health_rss_mb"] for r in rounds)
    echo("")
    echo(f"GET /status under {REQUESTS_PER_S} requests/s ({requests} answered, {failures} failed), "
         f"feed at {RATE:,} trades/s offered:")
    for r in loaded:
        echo(f"  round: p50 {r['status_ms']['p50']:.1f} ms, p99 {r['status_ms']['p99']:.1f} ms, "
             f"max {r['status_ms']['max']:.1f} ms")
    echo(f"  worst p99 {all_p99:.1f} ms (target < {TARGET_STATUS_P99_MS:g} ms): "
         f"{'met' if all_p99 < TARGET_STATUS_P99_MS else 'MISSED'}")
    echo("Feed, medians of the rounds without / with the load:")
    echo(f"  landed in the primary: {landed_quiet:,.0f} / {landed_loaded:,.0f} trades/s "
         f"(slowdown {slowdown:+.1f}%, target at most {TARGET_SLOWDOWN_PCT:g}%): "
         f"{'met' if slowdown <= TARGET_SLOWDOWN_PCT else 'MISSED'}")
    echo(f"  end-to-end latency p99: {p99_quiet:.1f} / {p99_loaded:.1f} ms")
    echo(f"health process: CPU {statistics.median(r['health_cpu_pct'] for r in quiet):.1f}% / "
         f"{statistics.median(r['health_cpu_pct'] for r in loaded):.1f}% of a core; "
         f"peak RSS {rss:.1f} MB (target < {TARGET_HEALTH_RSS_MB:g} MB): "
         f"{'met' if rss < TARGET_HEALTH_RSS_MB else 'MISSED'}")
