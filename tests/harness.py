"""Real parts for integration tests: a stand-in primary, the exchange simulator, the supervised stack,
and the id-by-id comparison of the primary against the simulator's history."""

import os
import shutil
import tempfile
import time

import redis

from btcfeed import keys

from tools import verify
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands.stack import Stack
from tools.verify import SOURCE, Verdict
from tools.simulator import SimulatorClient, start_simulator


def short_tmpdir(prefix: str = "bf-") -> str:
    # Unix socket paths are limited to 108 bytes: keep state dirs short.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


# The source each simulator mode feeds, and the websocket path its exchange serves the feed on.
MODE_SOURCES = {"binance": SOURCE, "coinbase": "coinbase:BTC-USD", "kraken": "kraken:BTC/USD"}
MODE_WS_PATHS = {"binance": "", "coinbase": "", "kraken": "/v2"}


class Simulator:
    def __init__(self, rate: float, seed: int = 7, mode: str = "binance", **options):
        self.mode = mode
        if mode != "binance":
            options["mode"] = mode
        self.process, self.port = start_simulator(rate=rate, seed=seed, **options)
        self.client = SimulatorClient(f"http://127.0.0.1:{self.port}")

    @property
    def source(self) -> str:
        return MODE_SOURCES[self.mode]

    @property
    def env(self) -> dict:
        prefix = f"BTCFEED_{self.mode.upper()}"
        return {f"{prefix}_WS_URL": f"ws://127.0.0.1:{self.port}{MODE_WS_PATHS[self.mode]}",
                f"{prefix}_REST_URL": f"http://127.0.0.1:{self.port}"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def stack_env(primary: RedisProcess, sim: Simulator, **extra) -> dict:
    return sources_env(primary, [sim], **extra)


def sources_env(primary: RedisProcess, sims, **extra) -> dict:
    """One stack fed by several simulators (one per exchange), each its own source."""
    env = {"BTCFEED_PRIMARY_URL": primary.url, "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
           "BTCFEED_SOURCES": ",".join(sim.source for sim in sims), "BTCFEED_LOG_LEVEL": "INFO"}
    for sim in sims:
        env.update(sim.env)
    env.update(extra)
    return env


def start_stack(primary: RedisProcess, sim: Simulator, **extra) -> Stack:
    return start_sources_stack(primary, [sim], **extra)


# Stacks started by the harness and not removed yet: drain() waits for their backfills.
RUNNING_STACKS = []


def start_sources_stack(primary: RedisProcess, sims, **extra) -> Stack:
    stack = Stack(short_tmpdir("bf-stack-"), sources_env(primary, sims, **extra))
    RUNNING_STACKS.append(stack)
    stack.up(wait_s=30)
    return stack


def remove_stack(stack: Stack) -> None:
    if stack in RUNNING_STACKS:
        RUNNING_STACKS.remove(stack)
    stack.down()
    shutil.rmtree(stack.state_dir, ignore_errors=True)


def gap_records(stack: Stack, source: str) -> int:
    """How many gap records (missing id ranges, or an open catch-up) the stack's ingest still has
    to fill for the source; 0 when its local Redis is gone (a stack killed on purpose)."""
    try:
        local = redis.Redis(unix_socket_path=os.path.join(stack.state_dir, "redis.sock"), socket_timeout=2)
        return local.hlen(keys.gaps(source))
    except redis.RedisError:
        return 0


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def primary_last_id(client, source: str = SOURCE) -> int:
    value = client.hget(keys.last(source), "id")
    return int(value) if value is not None else -1


def drain(primary_client, sim: Simulator, timeout_s: float = 60.0) -> int:
    """Stop the exchange and wait until the primary holds its last trade; returns that id."""
    sim.client.pause()
    last_id = sim.client.status()["last_id"]
    source = getattr(sim, "source", SOURCE)
    wait_for(lambda: primary_last_id(primary_client, source) >= last_id, timeout_s,
             f"primary to reach {source} trade {last_id} (it has {primary_last_id(primary_client, source)})")
    # Live trades land at once; what was missed is backfilled behind them: wait for that too.
    wait_for(lambda: all(gap_records(stack, source) == 0 for stack in RUNNING_STACKS), timeout_s,
             f"every stack's backfill of {source} to finish")
    return last_id


def wait_verified(stack: Stack, timeout_s: float = 30.0) -> None:
    """Wait until sync has compared everything the local copy held now with the primary (and re-sent
    what the primary lacked): after a loss, history comes back behind the live trades."""
    local = redis.Redis(unix_socket_path=os.path.join(stack.state_dir, "redis.sock"), socket_timeout=2)
    now_ms = int(time.time() * 1000)
    wait_for(lambda: int(local.hget(keys.SYNC_PRIMARY, "verified_ms") or 0) >= now_ms, timeout_s,
             "sync to verify the primary against the local copy")


def wait_source_trades(primary_client, sim: Simulator, count: int, timeout_s: float = 20) -> None:
    start = primary_last_id(primary_client, sim.source)
    wait_for(lambda: primary_last_id(primary_client, sim.source) >= start + count, timeout_s,
             f"{count} more {sim.source} trades in the primary")


def assert_exact(primary_client, sim: Simulator) -> Verdict:
    """Stop the exchange, wait for everything to land, and compare id by id, with the derived data."""
    last_id = drain(primary_client, sim)
    verdict = verify_primary(primary_client, sim)
    assert verdict.exact(), f"{sim.source}: {verdict}"
    assert verdict.present == verdict.expected > 0
    first = verify.lowest_trade_id(primary_client, sim.source)
    verify_derived(primary_client, sim, first, last_id)
    return verdict


def verify_primary(primary_client, sim: Simulator, from_id: int = None, to_id: int = None) -> Verdict:
    return verify.verify_primary(primary_client, sim.client, from_id, to_id, source=getattr(sim, "source", SOURCE))


def verify_derived(primary_client, sim: Simulator, from_id: int, to_id: int) -> None:
    problems = verify.derived_differences(primary_client, sim.client, from_id, to_id,
                                          source=getattr(sim, "source", SOURCE))
    assert not problems, problems[:5]
