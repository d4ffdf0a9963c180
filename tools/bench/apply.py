"""bin/btcfeed bench-apply: what one applied trade costs the primary (issue target: at most 5 µs of
the primary's CPU a trade), the apply script alone, against a reference measured in the same run.

Each case gets a fresh redis-server with AOF on (as the benches' stand-in primary) and is sent the
same trades; the server's own CPU (user + system, from psutil) over the case is divided by the
trades applied. The cases run in turn, RUNS times, and the medians are printed:

  reference   redis-benchmark's pipelined XADD of the same six fields per trade (a client fast enough
              that the server is the bound): the floor of one stream entry a trade;
  script floor  a script that only decodes the batch and calls XADD once per trade, in the replay's
              batches: the floor of any script that writes one stream entry a trade (DESIGN.md §3);
  replay      the apply script in 2,000-trade batches, 16 per round trip (sync's replay, a catch-up),
              with a live subscriber, and with none;
  live        the apply script in 3-trade batches, one per round trip (the writer at real rates).

The apply script runs as the writer runs it on the primary: the epoch checked, and the omega_ai
compatibility keys kept for the source (both on by default). Every case is checked: the trade stream
holds every trade once, and a subscriber received one live message per trade.
"""

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time

import psutil

from btcfeed import keys
from btcfeed.storage.apply import BatchApplier, read_candles
from btcfeed.trade import Trade, encode_batch
from tools.redis_process import RedisProcess

SOURCE = "binance:BTCUSDT"
RUNS = 3
TARGET_US = 5.0
REFERENCE_PIPELINE = 100
REFERENCE_TIMEOUT_S = 120
FIRST_ID = 1_000_000_000
# name, trades per batch, batches per round trip, live subscriber, trades in the case
CASES = (("replay, a live subscriber", 2000, 16, True, 200_000),
         ("replay, no subscriber", 2000, 16, False, 200_000),
         ("live-size batches, a live subscriber", 3, 1, True, 15_000))
EPOCH = "bench-apply"
# The floor of a script with the contract's layout: decode the bus's rows, one XADD each, nothing else.
FLOOR_SCRIPT = """
local rows = cjson.decode(ARGV[9])
for _, row in ipairs(rows) do
  redis.call('XADD', KEYS[1], '*', 'id', string.format('%d', row[1]), 'p', row[2], 'q', row[3],
             'side', row[4], 'ts', string.format('%d', row[5]), 'rts', string.format('%d', row[6]))
end
return {#rows, 0, 0}
"""
FLOOR_CASE = "script floor: decode + XADD"


def make_trades(count: int, now_ms: int) -> list:
    return [Trade(FIRST_ID + k, "%d.%02d" % (60000 + k % 500, k % 100), "0.00%d" % (1 + k % 9),
                  "buy" if k % 2 else "sell", now_ms - count + k, now_ms - count + k + 3)
            for k in range(count)]


class LiveCounter:
    """A subscriber to the source's live channel, counting what it receives."""

    def __init__(self, server: RedisProcess):
        self.pubsub = server.client().pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.live_channel(SOURCE))
        self.pubsub.get_message(timeout=1.0)          # the subscription's confirmation
        self.received = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            if self.pubsub.get_message(timeout=0.1) is not None:
                self.received += 1

    def drain(self, expected: int, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.received < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stopping.set()
        self.thread.join()
        self.pubsub.close()
        return self.received


def server_cpu_s(server: RedisProcess) -> float:
    times = psutil.Process(server.process.pid).cpu_times()
    return times.user + times.system


def run_reference(directory: str, count: int) -> dict:
    """redis-benchmark XADDs `count` entries of the trade stream's six fields, pipelined, one connection."""
    server = RedisProcess(directory, appendonly=True).start()
    try:
        stream = keys.trades(SOURCE)
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(server.port), "-n", str(count), "-c", "1",
                "-P", str(REFERENCE_PIPELINE), "-r", "1000000", "XADD", stream, "*", "id", "__rand_int__",
                "p", "60123.45", "q", "0.00123", "side", "buy", "ts", "1700000000000", "rts", "1700000000003"]
        started, cpu = time.monotonic(), server_cpu_s(server)
        subprocess.run(argv, capture_output=True, timeout=REFERENCE_TIMEOUT_S, check=True)
        result = _figures(server, started, cpu, count)
        result["exact"] = server.client().xlen(stream) == count
        return result
    finally:
        server.stop()


def product_applier(client, script: str = None) -> BatchApplier:
    """The apply script as the writer sends it to the primary: the epoch checked (the server is
    given the epoch first) and the compatibility keys kept for the source. `script` replaces it."""
    client.hset(keys.meta(SOURCE), "epoch", EPOCH)
    applier = BatchApplier(client, retention_ms=24 * 3600 * 1000, compat_source=SOURCE,
                           epochs={SOURCE: EPOCH})
    if script is not None:
        applier.script = client.register_script(script)
    return applier


def run_case(directory: str, trades: list, batch: int, per_round_trip: int, listen: bool,
             script: str = None) -> dict:
    server = RedisProcess(directory, appendonly=True).start()
    try:
        client = server.client()
        applier = product_applier(client, script)
        payloads = [encode_batch(trades[first:first + batch]) for first in range(0, len(trades), batch)]
        listener = LiveCounter(server) if listen else None
        started, cpu = time.monotonic(), server_cpu_s(server)
        applied = 0
        for first in range(0, len(payloads), per_round_trip):
            round_trip = payloads[first:first + per_round_trip]
            results = applier.apply_many([(SOURCE, payload) for payload in round_trip])
            applied += sum(result[0] for result in results)
        result = _figures(server, started, cpu, len(trades))
        received = listener.drain(len(trades)) if listener else len(trades)
        result["exact"] = (applied == len(trades) and client.xlen(keys.trades(SOURCE)) == len(trades)
                           and received == len(trades))
        return result
    finally:
        server.stop()


def _figures(server: RedisProcess, started: float, cpu_before: float, count: int) -> dict:
    elapsed = time.monotonic() - started
    return {"us": (server_cpu_s(server) - cpu_before) / count * 1e6, "rate": count / elapsed}


def run_apply_bench(echo=print, runs: int = RUNS) -> int:
    root = tempfile.mkdtemp(prefix="btcfeed-bench-apply-")
    now_ms = int(time.time() * 1000)
    samples = {"reference": [], FLOOR_CASE: []}
    samples.update({case[0]: [] for case in CASES})
    exact = True
    echo(f"btcfeed bench-apply  ({psutil.cpu_count()} cores; each case a fresh redis-server with AOF on; "
         f"{runs} runs in turn, medians)")
    try:
        for run in range(runs):
            figures = run_reference(os.path.join(root, f"reference-{run}"), CASES[0][4])
            samples["reference"].append(figures)
            exact &= figures["exact"]
            name, batch, per_round_trip, _, count = CASES[0]
            figures = run_case(os.path.join(root, f"floor-{run}"), make_trades(count, now_ms), batch,
                               per_round_trip, listen=False, script=FLOOR_SCRIPT)
            samples[FLOOR_CASE].append(figures)
            exact &= figures["exact"]
            for name, batch, per_round_trip, listen, count in CASES:
                figures = run_case(os.path.join(root, f"{len(samples[name])}-{run}-{batch}-{listen}"),
                                   make_trades(count, now_ms), batch, per_round_trip, listen)
                samples[name].append(figures)
                exact &= figures["exact"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    reference_us = statistics.median(f["us"] for f in samples["reference"])
    echo(f"  {'case':40s} {'primary CPU a trade':>20s} {'x reference':>12s} {'trades/s':>10s}")
    for name, figures in samples.items():
        us = statistics.median(f["us"] for f in figures)
        rate = statistics.median(f["rate"] for f in figures)
        labels = {"reference": "reference: redis-benchmark XADD", FLOOR_CASE: FLOOR_CASE}
        label = labels.get(name, f"apply, {name}")
        echo(f"  {label:40s} {us:17.2f} µs {us / reference_us:11.2f}x {rate:10,.0f}")
    replay_us = statistics.median(f["us"] for f in samples[CASES[0][0]])
    floor_us = statistics.median(f["us"] for f in samples[FLOOR_CASE])
    echo(f"  target: the primary at most {TARGET_US:.0f} µs a trade in replay batches with a subscriber: "
         f"{'met' if replay_us <= TARGET_US else 'NOT met'} ({replay_us:.2f} µs; the script floor "
         f"{floor_us:.2f} µs{', itself above the target' if floor_us > TARGET_US else ''})")
    echo(f"  exactness (every trade once in the stream, one live message each): {'ok' if exact else 'FAIL'}")
    return 0 if exact else 1


# --- a variant of the apply script against the product's, in paired runs -------------------------

COMPARE_BATCH = 2000
COMPARE_TRADES = 300_000
COMPARE_TURNS = 15                # each server takes this many turns a run
SMALL_BATCH = 100                 # batches below this go one per round trip (the writer's rounds)


def compare_scripts(variant_path: str, echo=print, runs: int = RUNS, trades: int = None,
                    batch: int = COMPARE_BATCH) -> int:
    """The product's apply script (A) and a variant (B) on two redis-servers pinned to one core
    (where the system allows it), sent the same batches in turns, so a change of the machine's speed
    falls on both: the primary's CPU per trade of each and B/A per run. Batches of `batch` trades,
    16 per round trip (a replay), or one per round trip below SMALL_BATCH (the writer at real
    rates). The variant must leave the same data: the trade streams' fields, the last hash, the
    candles, the compatibility keys and the seen-set's bytes are compared."""
    trades = trades or (COMPARE_TRADES if batch >= SMALL_BATCH else 30_000)
    with open(variant_path) as handle:
        variant = handle.read()
    root = tempfile.mkdtemp(prefix="btcfeed-bench-apply-compare-")
    echo(f"btcfeed bench-apply --compare-with {variant_path}  (A: the product's script, B: the variant; "
         f"{batch:,}-trade batches, {_per_round_trip(batch)} a round trip, {trades:,} trades, "
         f"{COMPARE_TURNS} turns each)")
    ratios, same = [], True
    try:
        for run in range(runs):
            a, b, equal = _paired_run(os.path.join(root, str(run)), variant, trades, batch)
            ratios.append(b / a)
            same &= equal
            echo(f"  run {run + 1}: A {a:.2f} µs a trade, B {b:.2f} µs, B/A {b / a:.3f}"
                 f"{'' if equal else '   B LEFT OTHER DATA'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    echo(f"  median B/A {statistics.median(ratios):.3f}; the same data in both: {'yes' if same else 'NO'}")
    return 0 if same else 1


def _per_round_trip(batch: int) -> int:
    return 16 if batch >= SMALL_BATCH else 1


def _paired_run(directory: str, variant: str, count: int, batch: int) -> tuple:
    trades = make_trades(count, int(time.time() * 1000))
    payloads = [encode_batch(trades[first:first + batch]) for first in range(0, len(trades), batch)]
    per_round_trip = _per_round_trip(batch)
    servers = [RedisProcess(os.path.join(directory, name), appendonly=True).start() for name in "ab"]
    own_cores = _keep_off_the_servers_core()
    try:
        for server in servers:
            _pin(server.process.pid)
        appliers = [product_applier(servers[0].client()), product_applier(servers[1].client(), variant)]
        used = [0.0, 0.0]
        per_turn = max(1, len(payloads) // COMPARE_TURNS)
        for turn, first in enumerate(range(0, len(payloads), per_turn)):
            for side in ((0, 1) if turn % 2 == 0 else (1, 0)):
                cpu = server_cpu_s(servers[side])
                for start in range(first, min(first + per_turn, len(payloads)), per_round_trip):
                    appliers[side].apply_many([(SOURCE, payload)
                                               for payload in payloads[start:start + per_round_trip]])
                used[side] += server_cpu_s(servers[side]) - cpu
        clients = [server.client() for server in servers]
        fields = [[entry[1] for entry in client.xrange(keys.trades(SOURCE))] for client in clients]
        equal = (fields[0] == fields[1] and len(fields[0]) == len(trades)
                 and clients[0].hgetall(keys.last(SOURCE)) == clients[1].hgetall(keys.last(SOURCE))
                 and read_candles(clients[0], SOURCE) == read_candles(clients[1], SOURCE)
                 and _compat(clients[0]) == _compat(clients[1])
                 and _seen(clients[0], trades) == _seen(clients[1], trades))
        return used[0] / len(trades) * 1e6, used[1] / len(trades) * 1e6, equal
    finally:
        if own_cores:
            os.sched_setaffinity(0, own_cores)
        for server in servers:
            server.stop()


def _compat(client) -> tuple:
    return (client.get(keys.COMPAT_LAST_PRICE), client.get(keys.COMPAT_LAST_UPDATE),
            client.lrange(keys.COMPAT_HISTORY, 0, -1))


def _seen(client, trades) -> list:
    """The seen-set's segments that the trades fall in, byte for byte."""
    numbers = sorted({trade.id >> keys.SEEN_SEGMENT_BITS for trade in trades})
    return [client.get(keys.seen_prefix(SOURCE) + str(number)) for number in numbers]


def _pin(pid: int) -> None:
    """Both servers on the last core, so neither gets a core of its own the other lacks."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, {_servers_core()})


def _servers_core() -> int:
    return max(os.sched_getaffinity(0) | {os.cpu_count() - 1})


def _keep_off_the_servers_core():
    """This process (the client) off the servers' core, so its work does not fall on theirs; the
    cores it had, to give back (None where that cannot be done)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = os.sched_getaffinity(0)
    others = cores - {_servers_core()}
    if others:
        os.sched_setaffinity(0, others)
    return cores
