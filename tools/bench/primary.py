"""bin/btcfeed bench-primary: the write path (the apply script, in pipelined batches as the writer
sends them) into different kinds of primary, measured in one run:

  1. the same redis-server over plain TCP and over TLS (certificates made for the run);
  2. a Redis Cluster of three masters, with three sources spread over the three masters versus
     three sources whose hash tags all fall on one master.

Each figure is the median of RUNS runs of RUN_S seconds. One process per source, each with its own
client made by common.primary.connect_primary (the product's own client, TLS verification on).
"""

import os
import shutil
import statistics
import subprocess
import tempfile
import multiprocessing
import time

import redis
from redis.crc import key_slot

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.storage.apply import BatchApplier
from btcfeed.storage.primary import connect_primary
from tools.redis_process import RedisProcess, free_port
from tools.tlscerts import make_test_pki, tls_server_args
from btcfeed.trade import Trade, encode_batch

BATCH_TRADES = 500
BATCHES_PER_CALL = 4              # the writer sends several bus entries in one pipelined round trip
RUN_S = 3.0
RUNS = 5
RETENTION_MS = 3600 * 1000


def synthetic_payloads(first_id: int, calls: int):
    """Pipelined calls' worth of batches with ascending new ids (nothing the primary has seen)."""
    now_ms = int(time.time() * 1000)
    next_id = first_id
    for _ in range(calls):
        call = []
        for _ in range(BATCHES_PER_CALL):
            trades = [Trade(i, "43000.01", "0.00120000", "buy" if i % 2 else "sell", now_ms, now_ms + 1)
                      for i in range(next_id, next_id + BATCH_TRADES)]
            next_id += BATCH_TRADES
            call.append(encode_batch(trades))
        yield call


def write_for(cfg, source: str, first_id: int, seconds: float, results) -> None:
    """One writer process: apply batches of new trades for `seconds`; report the count (or the error)."""
    applier = BatchApplier(connect_primary(cfg, 10_000), RETENTION_MS)
    deadline, applied = time.monotonic() + seconds, 0
    try:
        for call in synthetic_payloads(first_id, 10**9):
            if time.monotonic() >= deadline:
                break
            replies = applier.apply_many([(source, payload) for payload in call], int(time.time() * 1000))
            applied += sum(count for count, _ in replies)
    except redis.RedisError as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    results.put(("applied", applied))


def apply_rate(cfg, sources, run: int) -> float:
    """Trades/s applied by one writer process per source (separate processes: the client side must
    not be what limits a comparison of servers), over RUN_S seconds."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    writers = [context.Process(target=write_for, args=(cfg, source, (run + 1) * 10**9 + index * 10**8,
                                                       RUN_S, results))
               for index, source in enumerate(sources)]
    started = time.monotonic()
    for writer in writers:
        writer.start()
    replies = [results.get(timeout=RUN_S + 60) for _ in writers]
    elapsed = time.monotonic() - started
    for writer in writers:
        writer.join()
    errors = [text for kind, text in replies if kind == "error"]
    if errors:
        raise RuntimeError(errors[0])
    return sum(count for _, count in replies) / elapsed


def median_rate(cfg, sources) -> float:
    return statistics.median(apply_rate(cfg, sources, run) for run in range(RUNS))


def load(url: str, **extra) -> config_module.Config:
    env = {"BTCFEED_PRIMARY_URL": url, "BTCFEED_COMPAT_KEYS": "false", **extra}
    return config_module.load(env)


# --- TLS ---------------------------------------------------------------------------------------------
def tls_versus_plain(root: str) -> dict:
    certs = os.path.join(root, "pki")
    os.makedirs(certs)
    make_test_pki(certs)
    tls_port = free_port()
    server = RedisProcess(os.path.join(root, "tls"), appendonly=True,
                          extra_args=tls_server_args(certs, tls_port)).start()
    try:
        plain = load(f"redis://127.0.0.1:{server.port}/0")
        tls = load(f"rediss://127.0.0.1:{tls_port}/0", BTCFEED_PRIMARY_TLS_CA_FILE=f"{certs}/ca.crt")
        rates = {"plain": [], "tls": []}
        for run in range(RUNS):            # alternate, so drift on a shared machine hits both alike
            rates["plain"].append(apply_rate(plain, ["binance:BTCUSDT"], run))
            rates["tls"].append(apply_rate(tls, ["binance:BTCUSDT"], run + RUNS))
        return {k: statistics.median(v) for k, v in rates.items()}
    finally:
        server.stop()


# --- Cluster -------------------------------------------------------------------------------------------
MASTER_SLOTS = ((0, 5460), (5461, 10922), (10923, 16383))     # what redis-cli --cluster create assigns


def sources_by_master() -> dict:
    """For each master's slot range, source names whose hash tag lands in it."""
    found = {index: [] for index in range(len(MASTER_SLOTS))}
    number = 0
    while any(len(names) < 3 for names in found.values()):
        name = f"binance:SYM{number}USDT"
        slot = key_slot(keys.trades(name).encode())
        index = next(i for i, (low, high) in enumerate(MASTER_SLOTS) if low <= slot <= high)
        if len(found[index]) < 3:
            found[index].append(name)
        number += 1
    return found


def cluster_spread_versus_one(root: str) -> dict:
    nodes = []
    try:
        for index in range(3):
            directory = os.path.join(root, f"c{index}")
            cluster_args = ["--cluster-enabled", "yes",
                            "--cluster-config-file", os.path.join(directory, "nodes.conf")]
            nodes.append(RedisProcess(directory, port=_cluster_port(), extra_args=cluster_args).start())
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                       "--cluster-yes"], check=True, capture_output=True, timeout=60)
        _wait_cluster_ok(nodes)
        cfg = load("redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes))
        by_master = sources_by_master()
        spread = [names[0] for names in by_master.values()]
        one = by_master[0]
        rates = {"spread": [], "one": []}
        for run in range(RUNS):
            rates["spread"].append(apply_rate(cfg, spread, run))
            rates["one"].append(apply_rate(cfg, one, run + RUNS))
        return {k: statistics.median(v) for k, v in rates.items()}
    finally:
        for node in nodes:
            node.stop()


def _cluster_port() -> int:
    while True:
        port = free_port()
        if port <= 55000:
            return port


def _wait_cluster_ok(nodes, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(node.client().cluster("info")["cluster_state"] == "ok" for node in nodes):
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the cluster did not reach cluster_state:ok")


def run_primary_bench(echo=print) -> int:
    for tool in ("redis-server", "redis-cli", "openssl"):
        if shutil.which(tool) is None:
            echo(f"bench-primary: cannot run: {tool} is not installed")
            return 1
    root = tempfile.mkdtemp(prefix="bf-pbench-", dir="/tmp")
    try:
        echo(f"bench-primary: apply path, {BATCH_TRADES}-trade batches x{BATCHES_PER_CALL} per round trip, "
             f"median of {RUNS} runs of {RUN_S:g} s")
        echo("bench-primary: plain TCP and TLS into the same redis-server ...")
        tls = tls_versus_plain(root)
        echo("bench-primary: a three-master Redis Cluster, three sources spread over the masters "
             "or on one ...")
        cluster = cluster_spread_versus_one(root)
    except (redis.RedisError, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        echo(f"bench-primary: could not run: {type(exc).__name__}: {exc}")
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    echo("")
    echo(f"plain TCP      {tls['plain']:>10,.0f} trades/s")
    echo(f"TLS            {tls['tls']:>10,.0f} trades/s   ({tls['tls'] / tls['plain']:.2f}x plain TCP)")
    echo(f"cluster, 3 sources on 1 master   {cluster['one']:>10,.0f} trades/s")
    echo(f"cluster, 3 sources on 3 masters  {cluster['spread']:>10,.0f} trades/s   "
         f"({cluster['spread'] / cluster['one']:.2f}x one master)")
    echo(f"(this machine has {os.cpu_count()} cores; the servers and the writer processes share them)")
    return 0
