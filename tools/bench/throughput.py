"""bin/btcfeed bench: throughput, latency and memory of the real stack, next to redis-benchmark."""

import array
import bisect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import xmlrpc.client

import psutil
import redis

from btcfeed import keys
from btcfeed.exchanges.binance import REST_PAGE_LIMIT, WEIGHT_LIMIT_PER_MINUTE, WEIGHT_SAFE_FRACTION
from btcfeed.storage.bus import read_heartbeats
from btcfeed.commands.stack import PROGRAMS, StackError
from tools.rig import SimulatedStack
from tools.simulator import (DEFAULT_MAX_SEND_BUFFER, DEFAULT_START_ID, MAX_RATE, REST_WEIGHTS,
                                    SimulatorClient, SimulatorError, TickFeed, trade_payloads)

SOURCE = "binance:BTCUSDT"

# Reference: pipelined XADD straight into the stand-in primary, measured in the same run.
REFERENCE_KEY = "btcfeed-bench:reference"
REFERENCE_REQUESTS = 200_000
REFERENCE_PIPELINE = 64
REFERENCE_RUNS = 3
REFERENCE_TIMEOUT_S = 60.0

SAMPLE_INTERVAL_S = 0.2           # XLEN, RSS and CPU sampling period
WARMUP_MAX_S = 3.0                # left out of the steady-state figures ...
WARMUP_FRACTION = 0.2             # ... or this share of a short run
CONNECT_TIMEOUT_S = 20.0          # ingest's websocket must be open before the clock starts
DRAIN_TIMEOUT_S = 45.0            # after the throughput run, for the stack to land everything
DRAIN_STABLE_S = 1.0              # the primary's stream must stop growing for this long
DRAIN_ESTIMATE_AFTER_S = 5.0      # then give up early if the measured pace cannot make the timeout
VERIFY_CHUNK = 50_000             # stream entries per XRANGE while checking exactness

# The simulator drops a client with more than this unsent, as Binance does; raised here so that an
# ingest slower than the offered rate is measured at its own pace instead of being cut off and
# falling back to rate-limited REST backfill (the report says what the default would have done).
SIM_SEND_BUFFER = 1 << 30

LATENCY_RATE = 1000
LATENCY_SETTLE_S = 1.0            # received but not counted: the clock restarting after the pause
LATENCY_SECONDS = 10.0

NOISY_OTHER_PCT = 25.0            # "not ours" CPU above this makes the figures unreliable

TARGET_THROUGHPUT = 50_000        # trades/s landed in the primary, end to end
TARGET_P99_MS = 10.0              # at LATENCY_RATE
TARGET_RSS_MB = 80.0              # per stack process

MB = 1024 * 1024


class BenchError(RuntimeError):
    """The benchmark could not run; the text says why in one line."""


# --- processes: peak RSS and CPU per phase ------------------------------------------------------

class ProcessWatch:
    """Peak RSS, and CPU per phase, for named processes, the whole machine and everything not ours."""

    def __init__(self):
        self.procs = {}          # name -> psutil.Process
        self.stack_names = []    # the ones the RSS target applies to
        self.thread_names = []   # processes whose threads are broken down
        self.forking = set()     # processes whose fork children (AOF rewrite) count as their own
        self.peak_rss = {}       # name -> bytes
        self.peak_phase = {}     # name -> the phase in which the peak was seen
        self.cpu = {}            # phase -> name -> average % of one core
        self.others = {}         # phase -> [(% of one core, command)] of processes not ours
        self.threads = {}        # phase -> name -> [% of one core per thread, busiest first]
        self._phase = None

    def add(self, name: str, pid: int, stack: bool = False, threads: bool = False,
            forks: bool = False) -> None:
        try:
            self.procs[name] = psutil.Process(pid)
        except psutil.Error:
            return
        self.peak_rss.setdefault(name, 0)
        if stack:
            self.stack_names.append(name)
        if threads:
            self.thread_names.append(name)
        if forks:
            self.forking.add(name)

    def sample(self) -> None:
        phase = self._phase[0] if self._phase else "setup"
        for name, proc in self.procs.items():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            if rss > self.peak_rss[name]:
                self.peak_rss[name], self.peak_phase[name] = rss, phase

    def begin(self, phase: str) -> None:
        threads = {name: _thread_seconds(self.procs[name])
                   for name in self.thread_names if name in self.procs}
        self._phase = (phase, time.monotonic(), self._cpu_seconds(), _all_cpu_seconds(), threads)
        self.sample()

    def end(self) -> None:
        self.sample()
        phase, started, before, everyone_before, before_threads = self._phase
        elapsed = max(time.monotonic() - started, 1e-6)
        after, everyone_after = self._cpu_seconds(), _all_cpu_seconds()
        cpu = {name: 100.0 * (after[name] - before[name]) / elapsed for name in after if name in before}
        ours = sum(v for name, v in cpu.items() if name not in ("machine", "steal"))
        cpu["other"] = max(0.0, cpu["machine"] - ours)
        self.cpu[phase] = cpu
        # Processes not ours, grouped by command line; one started during the phase counts whole
        # (one that started and ended within it is only in the "not ours" total).
        our_pids = {proc.pid for proc in self.procs.values()} | set(self._fork_children())
        by_command = {}
        for key, seconds in everyone_after.items():
            if key[0] not in our_pids:
                by_command[key[2]] = by_command.get(key[2], 0.0) + seconds - everyone_before.get(key, 0.0)
        self.others[phase] = sorted(((100.0 * v / elapsed, c) for c, v in by_command.items()
                                     if 100.0 * v / elapsed >= 5.0), reverse=True)[:3]
        self.threads[phase] = {name: _thread_shares(self.procs[name], before_threads.get(name, {}), elapsed)
                               for name in self.thread_names if name in self.procs}
        self._phase = None

    def _fork_children(self):
        for name in self.forking:
            try:
                yield from (child.pid for child in self.procs[name].children())
            except psutil.Error:
                continue

    def _cpu_seconds(self) -> dict:
        seconds = {}
        for name, proc in self.procs.items():
            try:
                times = proc.cpu_times()
                total = times.user + times.system
                if name in self.forking:
                    # A live child's time so far, and a reaped one's in children_*: the sum is continuous.
                    total += times.children_user + times.children_system
                    for child in proc.children():
                        child_times = child.cpu_times()
                        total += child_times.user + child_times.system
            except psutil.Error:
                continue
            seconds[name] = total
        busy = psutil.cpu_times()
        # guest time is already inside user/nice; steal is time the hypervisor gave to someone else.
        not_busy = ("idle", "iowait", "guest", "guest_nice", "steal")
        seconds["machine"] = sum(getattr(busy, f) for f in busy._fields if f not in not_busy)
        seconds["steal"] = getattr(busy, "steal", 0.0)
        return seconds


def _thread_seconds(proc: psutil.Process) -> dict:
    try:
        return {t.id: t.user_time + t.system_time for t in proc.threads()}
    except psutil.Error:
        return {}


def _thread_shares(proc: psutil.Process, before: dict, elapsed: float) -> list:
    after = _thread_seconds(proc)
    shares = (100.0 * (seconds - before.get(tid, 0.0)) / elapsed for tid, seconds in after.items())
    return sorted((share for share in shares if share >= 0.5), reverse=True)


def _all_cpu_seconds() -> dict:
    """(pid, start time, short command line) -> CPU seconds, for every process on the machine."""
    seconds = {}
    for proc in psutil.process_iter(["cpu_times", "create_time", "name", "cmdline"]):
        info = proc.info
        if info["cpu_times"] is None:
            continue
        command = " ".join(" ".join(info["cmdline"] or [info["name"] or "?"]).split())
        cpu = info["cpu_times"]
        seconds[(proc.pid, info["create_time"], command[:60])] = cpu.user + cpu.system
    return seconds


# --- the rig: stand-in primary, simulator, supervised stack -------------------------------------

class Rig(SimulatedStack):
    """Everything the benchmark starts, in one temporary directory, torn down by close()."""

    def __init__(self):
        super().__init__("bf-bench-")

    def start_simulator(self, rate: float) -> None:
        super().start_simulator(rate, SIM_SEND_BUFFER)

    def start_stack(self) -> None:
        try:
            super().start_stack(CONNECT_TIMEOUT_S)
        except StackError as exc:
            raise BenchError(str(exc))

    def stack_pids(self) -> dict:
        return {p["name"]: p["pid"] for p in self.stack.processes() if p["pid"]}


# --- 1. reference -------------------------------------------------------------------------------

def reference_xadd(port: int, client: redis.Redis) -> dict:
    """redis-benchmark pipelined XADD against the stand-in primary; the median of a few runs."""
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(REFERENCE_REQUESTS),
            "-P", str(REFERENCE_PIPELINE), "--csv", "XADD", REFERENCE_KEY, "*", "f", "v"]
    runs = []
    try:
        for _ in range(REFERENCE_RUNS):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=REFERENCE_TIMEOUT_S)
            runs.append(_parse_benchmark_csv(result.stdout, result.stderr))
    except subprocess.TimeoutExpired:
        raise BenchError(f"redis-benchmark took more than {REFERENCE_TIMEOUT_S:.0f}s")
    finally:
        client.delete(REFERENCE_KEY)
    return {"runs": runs, "median": statistics.median(runs),
            "command": f"redis-benchmark -n {REFERENCE_REQUESTS} -P {REFERENCE_PIPELINE} XADD key * f v"}


def _parse_benchmark_csv(stdout: str, stderr: str) -> float:
    # --csv prints a header line, then "test","rps",... per command.
    for line in stdout.splitlines():
        cells = [cell.strip('"') for cell in line.split(",")]
        if len(cells) >= 2 and cells[0].upper().startswith("XADD"):
            try:
                return float(cells[1])
            except ValueError:
                break
    detail = (stderr or stdout).strip().splitlines()
    last = detail[-1][:200] if detail else "no output"
    raise BenchError(f"could not read redis-benchmark's result: {last}")


# --- 2. sustained throughput, drain and exactness -----------------------------------------------

def throughput_phase(rig: Rig, watch: ProcessWatch, seconds: float, rate: float) -> dict:
    stream = keys.trades(SOURCE)
    warmup = min(WARMUP_MAX_S, seconds * WARMUP_FRACTION)
    samples = []                      # (monotonic, XLEN of the primary's trade stream)
    rig.sim.set_rate(rate)
    watch.begin("throughput")
    rig.sim.resume()
    started = time.monotonic()
    sim_at_warmup = None
    next_at = started
    while True:
        now = time.monotonic()
        samples.append((now, rig.primary.xlen(stream)))
        watch.sample()
        if sim_at_warmup is None and now - started >= warmup:
            sim_at_warmup = _sim_generated(rig.sim)
        if now - started >= seconds:
            break
        next_at += SAMPLE_INTERVAL_S
        time.sleep(max(0.0, next_at - time.monotonic()))
    sim_at_end = _sim_generated(rig.sim)
    end_status = rig.sim.status()
    watch.end()

    steady = [s for s in samples if s[0] - started >= warmup]
    t0, n0 = steady[0]
    t1, n1 = steady[-1]
    generated_rate = (sim_at_end[1] - sim_at_warmup[1]) / max(sim_at_end[0] - sim_at_warmup[0], 1e-6)
    return {
        "seconds": seconds, "rate": rate, "warmup": warmup, "window": t1 - t0,
        "per_second": per_second_rates(steady),
        "average": (n1 - n0) / max(t1 - t0, 1e-6),
        "generated_rate": generated_rate,
        "sim_last_id_at_end": end_status["last_id"],
        "backlog": backlog(rig),
    }


def _sim_generated(sim: SimulatorClient):
    """(monotonic time in the middle of the call, trades generated so far)."""
    before = time.monotonic()
    generated = sim.status()["generated"]
    return (before + time.monotonic()) / 2, generated


def per_second_rates(samples) -> list:
    """Trades landed in each whole second of the sampled window, by linear interpolation."""
    times = [t for t, _ in samples]
    counts = [n for _, n in samples]

    def count_at(moment):
        i = bisect.bisect_left(times, moment)
        if i <= 0:
            return counts[0]
        if i >= len(times):
            return counts[-1]
        share = (moment - times[i - 1]) / max(times[i] - times[i - 1], 1e-9)
        return counts[i - 1] + share * (counts[i] - counts[i - 1])

    whole_seconds = int(times[-1] - times[0])
    return [count_at(times[0] + k + 1) - count_at(times[0] + k) for k in range(whole_seconds)]


def backlog(rig: Rig) -> dict:
    """What sits between the simulator and the primary right now."""
    bus_len = rig.local.xlen(keys.BUS)
    lag = None
    for group in rig.local.xinfo_groups(keys.BUS):
        if _text(group.get("name")) == keys.BUS_GROUP:
            lag = group.get("lag")
    cursor = int(rig.local.get(keys.cursor(SOURCE)) or 0)
    landed_last = int(rig.primary.hget(keys.last(SOURCE), "id") or DEFAULT_START_ID - 1)
    return {"bus_entries": bus_len, "bus_unread": lag, "on_bus_not_landed": max(0, cursor - landed_last),
            "cursor": cursor or DEFAULT_START_ID - 1, "landed_last_id": landed_last}


def drain(rig: Rig, watch: ProcessWatch) -> dict:
    """Pause the simulator and wait (within the budget) for the stack to land everything."""
    watch.begin("drain")
    rig.sim.pause()
    last_id = rig.sim.status()["last_id"]
    stream = keys.trades(SOURCE)
    started = time.monotonic()
    length_at_pause = rig.primary.xlen(stream)
    length, stable_since = length_at_pause, started
    outcome = "timeout"
    while time.monotonic() - started < DRAIN_TIMEOUT_S:
        time.sleep(SAMPLE_INTERVAL_S)
        watch.sample()
        now = time.monotonic()
        now_length = rig.primary.xlen(stream)
        if now_length != length:
            length, stable_since = now_length, now
        landed_last = int(rig.primary.hget(keys.last(SOURCE), "id") or 0)
        if landed_last >= last_id and now - stable_since >= DRAIN_STABLE_S:
            outcome = "drained"
            break
        # Once the pace is known, do not wait for a drain that cannot finish within the budget.
        if now - started >= DRAIN_ESTIMATE_AFTER_S and landed_last < last_id:
            pace = (now_length - length_at_pause) / (now - started)
            if pace <= 0 or (last_id - landed_last) / pace > 1.2 * (DRAIN_TIMEOUT_S - (now - started)):
                outcome = "hopeless"
                break
    drain_seconds = time.monotonic() - started
    watch.end()
    landed_in_drain = rig.primary.xlen(stream) - length_at_pause
    if outcome != "drained":
        try:
            rig.stack.stop("writer")  # freeze the stream so the check reads one consistent state
        except xmlrpc.client.Fault:
            pass                      # not running (restarting): the stream is still enough to check
    remaining = last_id - int(rig.primary.hget(keys.last(SOURCE), "id") or DEFAULT_START_ID - 1)
    return {"drained": outcome == "drained", "outcome": outcome, "drain_seconds": drain_seconds,
            "sim_last_id": last_id, "drained_trades": landed_in_drain,
            "drain_rate": landed_in_drain / max(drain_seconds, 1e-6),
            "remaining": remaining}


def exactness(client: redis.Redis, stream: str, last_id: int) -> dict:
    """Is each id from the first in the primary to the simulator's last there exactly once? (read back)"""
    raw = redis.Redis(connection_pool=client.connection_pool)
    # The raw reply (no dict per entry) keeps reading a few million entries quick.
    raw.set_response_callback("XRANGE", lambda response, **options: response)
    ids, start = [], "-"
    while True:
        chunk = raw.xrange(stream, min=start, max="+", count=VERIFY_CHUNK)
        if not chunk:
            break
        for _, fields in chunk:
            if fields[0] == b"id":
                ids.append(int(fields[1]))
            else:
                ids.append(int(dict(zip(fields[::2], fields[1::2]))[b"id"]))
        start = "(" + _text(chunk[-1][0])
    if not ids:
        return {"entries": 0, "first_id": None}
    first_id, highest = min(ids), max(ids)
    expected = last_id - first_id + 1
    seen = bytearray(max(expected, 0))
    duplicated = outside = 0
    for trade_id in ids:
        index = trade_id - first_id
        if index >= expected:
            outside += 1
        elif seen[index]:
            duplicated += 1
        else:
            seen[index] = 1
    # Ids above the highest one landed are still on their way; a missing id below it is a hole.
    landed_span = min(highest, last_id) - first_id + 1
    holes = seen.count(0, 0, landed_span)
    return {"entries": len(ids), "first_id": first_id, "highest_id": highest, "expected": expected,
            "missing": seen.count(0), "holes": holes, "not_landed": seen.count(0) - holes,
            "duplicated": duplicated, "outside": outside}


# --- 3. latency at a low rate -------------------------------------------------------------------

class LiveListener(threading.Thread):
    """Receives the primary's live channel and stamps each message on arrival."""

    def __init__(self, client: redis.Redis):
        super().__init__(name="live-listener", daemon=True)
        self.pubsub = client.pubsub()
        self.received = []            # (arrival ms, payload bytes)
        self.stopping = threading.Event()

    def subscribe(self, timeout_s: float = 5.0) -> None:
        """Subscribe and wait for the server's confirmation, so no trade published after it is missed."""
        self.pubsub.subscribe(keys.live_channel(SOURCE))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "subscribe":
                return
        raise BenchError("the primary did not confirm the subscription to its live channel")

    def run(self) -> None:
        append, clock = self.received.append, time.time
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                append((clock() * 1000.0, message["data"]))

    def close(self) -> None:
        self.stopping.set()
        self.join(timeout=2)
        self.pubsub.close()


def latency_phase(rig: Rig, watch: ProcessWatch) -> dict:
    rig.sim.set_rate(LATENCY_RATE)
    listener = LiveListener(redis.Redis(host="127.0.0.1", port=rig.primary_server.port, socket_timeout=None))
    listener.subscribe()
    listener.start()
    try:
        rig.sim.resume()
        started = time.monotonic()
        counted_from_ms = time.time() * 1000.0 + LATENCY_SETTLE_S * 1000.0
        watch.begin("latency")
        next_at = started
        while time.monotonic() - started < LATENCY_SETTLE_S + LATENCY_SECONDS:
            watch.sample()
            next_at += SAMPLE_INTERVAL_S
            time.sleep(max(0.0, next_at - time.monotonic()))
        watch.end()
        rig.sim.pause()
        time.sleep(0.3)               # let what is in flight arrive
    finally:
        listener.close()
    total, to_ingest, after_ingest = [], [], []
    for arrived_ms, payload in listener.received:
        if arrived_ms < counted_from_ms:
            continue
        trade = json.loads(payload)
        total.append(arrived_ms - trade["ts"])
        to_ingest.append(trade["rts"] - trade["ts"])
        after_ingest.append(arrived_ms - trade["rts"])
    return {"count": len(total), "total": percentiles(total), "to_ingest": percentiles(to_ingest),
            "after_ingest": percentiles(after_ingest)}


def percentiles(values) -> dict:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(share):
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


# --- the run ------------------------------------------------------------------------------------

def run_bench(seconds: float = 15, rate: float = 100_000, echo=print) -> int:
    """Run the benchmark and print the figures; 0 if it ran (targets met or not), 1 if it could not."""
    problem = _preflight(seconds, rate)
    if problem:
        echo(f"bench: cannot run: {problem}")
        return 1
    run_started = time.monotonic()
    rig = Rig()
    watch = ProcessWatch()
    watch.add("bench (this)", os.getpid())
    ok = False
    try:
        echo(f"bench: working in {rig.root}")
        rig.start_primary()
        watch.add("primary", rig.primary_server.process.pid, forks=True)
        echo(f"bench: reference: redis-benchmark XADD x{REFERENCE_RUNS} against the stand-in primary ...")
        reference = reference_xadd(rig.primary_server.port, rig.primary)
        rig.start_simulator(LATENCY_RATE)
        watch.add("simulator", rig.sim_process.pid)
        echo("bench: starting the supervised stack ...")
        rig.start_stack()
        watch.add("supervisord", rig.stack.supervisord_pid())
        pids = rig.stack_pids()
        for name in PROGRAMS:
            if name in pids:
                watch.add(name, pids[name], stack=True, threads=name == "ingest", forks=name == "redis-local")
        # Latency first, on a calm stack: whatever backlog the throughput run leaves cannot skew it.
        echo(f"bench: latency: {LATENCY_RATE:,} trades/s for {LATENCY_SECONDS:g} s ...")
        latency = latency_phase(rig, watch)
        echo(f"bench: throughput: simulator at {rate:,.0f} trades/s for {seconds:g} s ...")
        throughput = throughput_phase(rig, watch, seconds, rate)
        echo(f"bench: pausing the simulator; draining (up to {DRAIN_TIMEOUT_S:.0f} s) "
             "and checking every id ...")
        exact = drain(rig, watch)
        redis_memory = {"redis-local": _used_memory_peak(rig.local),
                        "primary": _used_memory_peak(rig.primary)}
        local_keys = {"bus": _key_mb(rig.local, keys.BUS),
                      "local trade copy": _key_mb(rig.local, keys.trades(SOURCE))}
        exact.update(exactness(rig.primary, keys.trades(SOURCE), exact["sim_last_id"]))
        feed_counts = _ingest_counts(rig)
        restarts = _restarted(rig, pids)
        ok = True
    except (BenchError, StackError, SimulatorError, redis.RedisError, OSError, xmlrpc.client.Error) as exc:
        echo(f"bench: could not run: {_one_line(exc)}")
        return 1
    except KeyboardInterrupt:
        echo("bench: interrupted; tearing down")
        return 1
    except Exception as exc:  # the command promises one readable line, not a traceback
        echo(f"bench: could not run: {type(exc).__name__}: {_one_line(exc)}")
        return 1
    finally:
        rig.close(keep=not ok)
        if not ok:
            echo(f"bench: logs kept in {rig.root}")
    report(echo, rate, reference, throughput, exact, feed_counts, latency, watch, restarts, redis_memory,
           local_keys, time.monotonic() - run_started)
    return 0


def _preflight(seconds: float, rate: float):
    for tool in ("redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if not 0 < rate <= MAX_RATE:
        return f"--rate must be above 0 and at most {MAX_RATE:,.0f} (the simulator's maximum)"
    if seconds < 3:
        return "--seconds must be at least 3 (warm-up is left out of the figures)"
    return None


def _used_memory_peak(client: redis.Redis) -> float:
    """The server's own peak of allocated memory (its dataset and buffers), in MB."""
    return client.info("memory")["used_memory_peak"] / MB


def _key_mb(client: redis.Redis, key: str) -> float:
    """MEMORY USAGE of one key (sampled estimate), in MB; 0 when it does not exist."""
    return (client.memory_usage(key) or 0) / MB


def _ingest_counts(rig: Rig) -> dict:
    beat = read_heartbeats(rig.local, ("ingest",)).get("ingest") or {}
    return (beat.get("sources") or {}).get(SOURCE, {})


def _restarted(rig: Rig, pids_before: dict) -> list:
    """Stack processes running under a new pid (they died and supervisord restarted them)."""
    now = rig.stack_pids()
    return [name for name, pid in pids_before.items() if now.get(name, pid) != pid]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the report ---------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def report(echo, rate, reference, throughput, exact, feed, latency, watch, restarts, redis_memory,
           local_keys, elapsed) -> None:
    """The whole table, section by section, then one line of verdicts."""
    cores = psutil.cpu_count()
    echo("")
    echo(f"btcfeed bench  ({cores} cores, Python {platform.python_version()}, {_redis_version()}, "
         f"default stack settings, source {SOURCE})")
    echo("=" * 104)
    ref = reference["median"]
    echo("1. reference: pipelined XADD straight into the same stand-in primary (AOF on), same run")
    echo(f"   {reference['command']:<56} {ref:>10,.0f} req/s  (median of "
         f"{len(reference['runs'])}: {', '.join(f'{r:,.0f}' for r in reference['runs'])})")
    echo("")
    median_rate, exact_ok = _report_throughput(echo, rate, ref, throughput, exact, feed)
    echo("")
    p99 = _report_latency(echo, latency)
    echo("")
    largest = _report_processes(echo, watch, restarts, redis_memory, local_keys, cores)
    echo("")
    echo(f"targets: throughput {_verdict(median_rate >= TARGET_THROUGHPUT)} ({median_rate:,.0f}/s vs "
         f">= {TARGET_THROUGHPUT:,}/s) | latency {_verdict(p99 is not None and p99 < TARGET_P99_MS)} "
         f"(p99 {_ms(p99)} vs < {TARGET_P99_MS:g} ms) | memory {_verdict(largest <= TARGET_RSS_MB)} "
         f"(max {largest:.1f} MB vs <= {TARGET_RSS_MB:g} MB) | exactness {'OK' if exact_ok else 'FAIL'} | "
         f"run took {elapsed:.0f} s")


def _report_throughput(echo, rate, ref, throughput, exact, feed):
    per_second = throughput["per_second"]
    median_rate = statistics.median(per_second) if per_second else throughput["average"]
    average = throughput["average"]
    generated = throughput["generated_rate"]
    b = throughput["backlog"]
    behind = max(0, throughput["sim_last_id_at_end"] - b["landed_last_id"])
    not_on_bus = max(0, throughput["sim_last_id_at_end"] - b["cursor"])
    kept_up = average >= 0.95 * generated and behind <= max(1.0, 0.5 * average)
    echo("2. sustained end-to-end throughput: simulator -> ingest -> bus -> writer -> primary trade stream")
    echo(f"   simulator asked {rate:,.0f}/s for {throughput['seconds']:g} s; first "
         f"{throughput['warmup']:.1f} s left out as warm-up; steady window {throughput['window']:.1f} s")
    echo(f"   simulator generated                            {generated:>10,.0f} trades/s")
    echo(f"   landed, median of per-second rates             {median_rate:>10,.0f} trades/s   "
         f"= {median_rate / ref:.3f} x reference   target >= {TARGET_THROUGHPUT:,}/s  "
         f"{_verdict(median_rate >= TARGET_THROUGHPUT)}")
    echo(f"   landed, average over the window                {average:>10,.0f} trades/s   "
         f"= {average / ref:.3f} x reference")
    if per_second:
        echo("   per second (k/s): " + " ".join(f"{v / 1000:.1f}" for v in per_second))
    echo(f"   kept up: {'yes' if kept_up else 'no'}; at the end {behind:,} trades generated but not in the "
         f"primary ({behind / max(average, 1):.1f} s of landing): {not_on_bus:,} not yet on the bus "
         f"(simulator send buffer, socket, ingest), {b['on_bus_not_landed']:,} on the bus")
    unread = "n/a" if b["bus_unread"] is None else f"{b['bus_unread']:,}"
    echo(f"   bus backlog at the end: XLEN {b['bus_entries']:,} entries, {unread} not yet read by the writer")
    if not kept_up and generated > average:
        excess = (generated - average) * _wire_bytes_per_trade()
        echo(f"   note: the simulator's slow-client limit was raised to {SIM_SEND_BUFFER // MB:,} MB "
             f"for this run; with the default {DEFAULT_MAX_SEND_BUFFER // MB} MB")
        echo(f"   (Binance-like) it would have dropped ingest after about "
             f"{DEFAULT_MAX_SEND_BUFFER / excess:.0f} s, and REST backfill recovers at most "
             f"~{_rest_backfill_rate():,.0f} trades/s")
    echo(f"   ingest counters: gaps {feed.get('gaps', 'n/a')}, backfilled {feed.get('backfilled', 'n/a')}, "
         f"reconnects {feed.get('reconnects', 'n/a')}, duplicates dropped {feed.get('duplicates', 'n/a')}, "
         f"dead-lettered {feed.get('deadlettered', 'n/a')}")
    if exact["drained"]:
        echo(f"   drain: everything landed within {exact['drain_seconds']:.1f} s of pausing the simulator "
             f"({exact['drained_trades']:,} trades landed meanwhile)")
    else:
        rest = exact["remaining"] / max(exact["drain_rate"], 1.0)
        why = (f"stopped waiting after {exact['drain_seconds']:.0f} s" if exact["outcome"] == "hopeless"
               else f"NOT complete {exact['drain_seconds']:.0f} s after the simulator paused")
        echo(f"   drain: {why}: {exact['drain_rate']:,.0f} trades/s while draining, "
             f"{exact['remaining']:,} trades still to land (~{rest:.0f} s more);")
        echo("   the writer was stopped so that the check below reads one fixed state")
    if exact["first_id"] is None:
        echo("   exactness: the primary's trade stream is empty  FAIL")
        return median_rate, False
    exact_ok = exact["holes"] == 0 and exact["duplicated"] == 0 and exact["outside"] == 0
    echo(f"   exactness over ids {exact['first_id']:,}..{exact['sim_last_id']:,} "
         f"({exact['expected']:,} trades, both phases; simulator's first id {DEFAULT_START_ID:,}):")
    echo(f"     {exact['entries']:,} stream entries; {exact['duplicated']:,} duplicated; "
         f"{exact['holes']:,} missing below the highest landed id; "
         f"{exact['not_landed']:,} not landed yet (above it); {exact['outside']:,} outside the range   "
         f"{'OK' if exact_ok else 'FAIL'}")
    return median_rate, exact_ok


def _report_latency(echo, latency):
    lat = latency["total"]
    echo(f"3. latency at {LATENCY_RATE:,} trades/s (measured before the throughput run): "
         f"{latency['count']:,} trades in {LATENCY_SECONDS:g} s on the live channel")
    rows = (("exchange ts -> subscriber", lat), ("  ts -> ingest receive (rts)", latency["to_ingest"]),
            ("  rts -> subscriber", latency["after_ingest"]))
    for label, part in rows:
        met = lat["p99"] is not None and lat["p99"] < TARGET_P99_MS
        verdict = f"   target p99 < {TARGET_P99_MS:g} ms  {_verdict(met)}" if part is lat else ""
        echo(f"   {label:<30} p50 {_ms(part['p50']):>8}   p99 {_ms(part['p99']):>8}   "
             f"max {_ms(part['max']):>8}{verdict}")
    echo("   the figure is arrival in this process minus `ts`, on one host clock. It includes websocket")
    echo("   send, ingest parse and batching, the bus XADD, the writer's XREADGROUP, the apply script and")
    echo("   its PUBLISH, and delivery here. `ts` and `rts` are whole ms (truncated), so a figure can read")
    echo("   up to 1 ms high; `ts` is the emit time of the simulator's 5 ms generation tick, so tick")
    echo("   batching itself is not included.")
    return lat["p99"]


def _report_processes(echo, watch, restarts, redis_memory, local_keys, cores) -> float:
    """The per-process table; returns the largest peak RSS of a stack process, in MB."""
    echo(f"4. processes: peak RSS sampled every {SAMPLE_INTERVAL_S:g} s during latency, throughput and "
         f"drain; CPU = average % of one core per phase ({cores} cores = {100 * cores}%);")
    echo("   a Redis's CPU includes its fork children (AOF rewrite)")
    echo(f"   {'process':<14} {'pid':>7} {'peak RSS':>10} {'(when)':<12} {'CPU lat':>8} {'CPU thru':>9} "
         f"{'CPU drain':>10}  note")
    thru, lat_cpu, drain_cpu = (watch.cpu.get(phase, {}) for phase in ("throughput", "latency", "drain"))

    def cpu_cells(name):
        return f"{_pct(lat_cpu.get(name)):>8} {_pct(thru.get(name)):>9} {_pct(drain_cpu.get(name)):>10}"

    blank = f"{'':>7} {'':>10} {'':<12}"
    for name in list(watch.stack_names) + [n for n in watch.procs if n not in watch.stack_names]:
        rss = watch.peak_rss.get(name, 0) / MB
        notes = []
        if name not in watch.stack_names:
            notes.append("information")
        elif rss > TARGET_RSS_MB:
            notes.append(f"OVER {TARGET_RSS_MB:g} MB")
        if name in redis_memory:
            notes.append(f"Redis used_memory peak {redis_memory[name]:.1f} MB")
        echo(f"   {name:<14} {watch.procs[name].pid:>7} {rss:>7.1f} MB {watch.peak_phase.get(name, ''):<12} "
             f"{cpu_cells(name)}  {'; '.join(notes)}")
    echo(f"   {'whole machine':<14} {blank} {cpu_cells('machine')}")
    echo(f"   {'not ours':<14} {blank} {cpu_cells('other')}  other processes, interrupts")
    if any(phase.get("steal", 0) >= 1 for phase in (thru, lat_cpu, drain_cpu)):
        echo(f"   {'steal':<14} {blank} {cpu_cells('steal')}  taken by the hypervisor")
    echo("   redis-local holds at the end: "
         + ", ".join(f"{name} {size:.1f} MB" for name, size in local_keys.items()))
    largest = max((watch.peak_rss.get(name, 0) / MB for name in watch.stack_names), default=0.0)
    echo(f"   target: no stack process over {TARGET_RSS_MB:g} MB RSS (max {largest:.1f} MB)  "
         f"{_verdict(largest <= TARGET_RSS_MB)}")
    for name, shares in watch.threads.get("throughput", {}).items():
        if shares:
            echo(f"   {name} threads during the throughput run (% of one core, busiest first): "
                 + ", ".join(f"{v:.0f}%" for v in shares) + f"  (sum {sum(shares):.0f}%; one GIL)")
    ranked = sorted(((v, n) for n, v in thru.items() if n not in ("machine", "other", "steal")), reverse=True)
    if ranked:
        machine = (f"; the machine was {thru['machine']:.0f}% of {100 * cores}% busy"
                   if "machine" in thru else "")
        echo("   busiest during the throughput run: " + ", ".join(f"{n} {v:.0f}%" for v, n in ranked[:3])
             + machine)
    others = watch.others.get("throughput") or []
    if others:
        echo("   busiest processes not ours during the throughput run: "
             + "; ".join(f"{share:.0f}% {command}" for share, command in others))
    if restarts:
        echo(f"   restarted during the run (pid changed): {', '.join(restarts)}")
    noisy = max(phase.get("other", 0.0) for phase in (thru, lat_cpu, drain_cpu))
    if noisy >= NOISY_OTHER_PCT:
        echo(f"   WARNING: processes not ours used up to {noisy:.0f}% of one core during the measurements; "
             f"on a quieter machine the figures would be better")
    return largest


def _wire_bytes_per_trade() -> int:
    """Bytes one trade takes on the simulator's combined stream (frame header included)."""
    payloads = trade_payloads("BTCUSDT", DEFAULT_START_ID, array.array("i", [4_300_000]),
                              array.array("H", [0]), bytearray(1), int(time.time() * 1000), ("0.05000000",))
    return len(TickFeed(payloads, "btcusdt@trade").joined(True, False))


def _rest_backfill_rate() -> float:
    """Trades per second the REST backfill can fetch within ingest's share of the weight budget."""
    weight = REST_WEIGHTS["/api/v3/historicalTrades"]
    pages_per_minute = WEIGHT_LIMIT_PER_MINUTE * WEIGHT_SAFE_FRACTION / weight
    return pages_per_minute * REST_PAGE_LIMIT / 60.0


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "redis-server"
    for part in out.split():
        if part.startswith("v="):
            return "redis-server " + part[2:]
    return "redis-server"


if __name__ == "__main__":
    sys.exit(run_bench())
