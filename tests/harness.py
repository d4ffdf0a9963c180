"""Real parts for integration tests: a stand-in primary, the exchange simulator, the supervised stack,
and the id-by-id comparison of the primary against the simulator's history."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import redis
from redis.cluster import ClusterNode, RedisCluster

from btcfeed import keys

from tools import verify
from tools.redis_process import RedisProcess, free_port, port_is_free
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
           "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}",
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


def run_until(argv, accept, timeout_s: float, what: str, **run_options) -> list:
    """Run a command again and again until accept(result) holds; every result so far (the caller may
    check them all). A young stack may not have written its first heartbeats yet on a loaded
    machine, which bin/health rightly calls critical: such answers are asked again, not failed.
    On timeout the failure shows the last run's output."""
    results = []

    def accepted():
        results.append(subprocess.run(argv, capture_output=True, text=True, timeout=60, **run_options))
        return accept(results[-1])
    try:
        wait_for(accepted, timeout_s, what, interval_s=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer: {results[-1].stdout!r} {results[-1].stderr!r}")
    return results


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
    return verify.verify_primary(primary_client, sim.client, from_id, to_id,
                                 source=getattr(sim, "source", SOURCE))


def verify_derived(primary_client, sim: Simulator, from_id: int, to_id: int) -> None:
    problems = verify.derived_differences(primary_client, sim.client, from_id, to_id,
                                          source=getattr(sim, "source", SOURCE))
    assert not problems, problems[:5]


def local_client(stack: Stack) -> redis.Redis:
    """The stack's local Redis, through its unix socket."""
    return redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)


def health(stack: Stack):
    """(HTTP status, document) of the stack's GET /health."""
    port = int(stack.env["BTCFEED_HEALTH_ADDR"].rsplit(":", 1)[1])
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health_when(stack: Stack, condition):
    """For wait_for: the stack's (code, /health document) once condition holds for it, else None."""
    def check():
        answer = health(stack)
        return answer if condition(answer) else None
    return check


def writer_state(stack: Stack) -> str:
    value = local_client(stack).hget(keys.WRITER_STATE, "state")
    return value.decode() if value else "primary"


# --- a Redis Cluster of real redis-server processes on loopback ---------------------------------

NODE_TIMEOUT_MS = 1000


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (free_port's range keeps the bus's clear)."""
    while True:
        port = free_port()
        if port_is_free(port + 10000):
            return port


class Cluster:
    def __init__(self, masters: int = 3, replicas: int = 1):
        self.root = short_tmpdir("bf-cluster-")
        self.nodes = []
        try:
            self._create(masters, replicas)
        except BaseException:
            self.close()         # leave no server behind when the set-up fails
            raise

    def _create(self, masters: int, replicas: int) -> None:
        for index in range(masters * (1 + replicas)):
            directory = os.path.join(self.root, f"n{index}")
            self.nodes.append(RedisProcess(directory, port=cluster_port(), extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(directory, "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]).start())
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                        "--cluster-replicas", str(replicas), "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_for(self.ok, 30, "cluster_state:ok on every node")
        wait_for(self.replicas_in_sync, 30, "every replica in sync with its master")

    def replicas_in_sync(self) -> bool:
        infos = [node.client().info("replication") for node in self.nodes]
        return all(info.get("master_link_status") == "up" for info in infos if info.get("role") == "slave")

    def ok(self) -> bool:
        try:
            return all(node.client().cluster("info")["cluster_state"] == "ok" for node in self.nodes
                       if node.process.poll() is None)
        except redis.RedisError:
            return False

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes
                                           if n.process.poll() is None], socket_timeout=5)

    def master_of(self, key: str) -> RedisProcess:
        port = self.client().get_node_from_key(key).port
        return next(node for node in self.nodes if node.port == port)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:3])

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def kill_host(stack) -> list:
    """SIGKILL supervisord and every process it runs at once (a host crash), and wait until all are gone.
    supervisord goes first: killed after a child, it could start that child again before it dies,
    leaving a process that outlives the 'crash' (and holds its port)."""
    pids = [stack.supervisord_pid()] + [info["pid"] for info in stack.processes() if info["pid"]]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(running(pid) for pid in pids), 10, "every process of the stack to be gone")
    return pids


def running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
