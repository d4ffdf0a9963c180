"""bin/btcfeed bench-failover: what a primary failure costs, in figures (DESIGN.md §2, §4, §7).

1. Failover window: for a SIGKILLed primary (restarted with its data) and a SIGSTOPped one (black
   hole, then SIGCONT), each trade's time from its exchange time to the moment it was durable
   somewhere (local failover copy or primary), read from the stream entry ids of both servers.
2. Replay: a backlog of known size built honestly (the primary frozen while the simulator runs
   fast), then the drain timed by sync's own hand_back event and by polling from here.
3. The same SIGKILL through redis-py's MultiDBClient (library defaults, two databases), writing
   one XADD per trade at the same rate, side by side with btcfeed.
4. Exactness of the whole run, id by id against the simulator's history.

Everything runs on loopback in one temporary directory and is torn down at the end.
"""

import array
import collections
import logging
import os
import platform
import shutil
import subprocess
import textwrap
import threading
import time
import warnings
import xmlrpc.client

import psutil
import redis

from btcfeed import keys
from btcfeed.storage import backlog
from btcfeed.storage.bus import read_heartbeats
from btcfeed.events import recent_events
from tools.redis_process import RedisProcess
from btcfeed.commands.stack import StackError
from tools.rig import SimulatedStack
from tools.verify import SOURCE, verify_primary
from tools.simulator import MAX_RATE, SimulatorError
from btcfeed.processes.writer import DRAINING, PRIMARY

# The simulator drops a client with more than 64 MB unsent (as Binance does). While the backlog is
# built at a rate above what ingest takes in, the excess waits in that buffer instead.
SIM_SEND_BUFFER = 1 << 30

CONNECT_TIMEOUT_S = 20.0          # ingest's websocket must be open before the clock starts
WARMUP_S = 2.0                    # trades flowing into the primary before the first fault
SETTLE_TIMEOUT_S = 60.0           # for the primary to hold every trade generated so far
HAND_BACK_TIMEOUT_S = 90.0        # from the primary's return to the writer being back on it
POLL_S = 0.01                     # writer state polling while timing a fault
STREAM_CHUNK = 20_000             # entries per XRANGE when reading entry times back
LOOKBACK_MS = 3_000               # read stream entries from this long before the fault

REPLAY_SIM_RATE = 50_000          # simulator rate while the backlog builds
REPLAY_BACKLOG_TRADES = 200_000   # at least this many trades in the backlog
REPLAY_BUILD_MARGIN = 1.02        # the simulator stops its fast run a little past the goal
REPLAY_BUILD_TIMEOUT_S = 30.0
REPLAY_CATCH_UP_TIMEOUT_S = 90.0  # for ingest to land the burst once the rate is back to normal

MULTIDB_KEY = "btcfeed-bench:multidb"
MULTIDB_LEAD_S = 1.5              # MultiDBClient writes this long before the fault
MULTIDB_TAIL_S = 5.0              # and at least this long after the primary is back
MULTIDB_JOIN_S = 30.0

NOISY_OTHER_PCT = 25.0            # CPU of processes not ours above this makes the figures unreliable

TARGET_P99_KILL_S = 1.0
TARGET_P99_STOP_S = 1.5
TARGET_REPLAY_RATE = 100_000      # trades/s, beside the live feed
TARGET_REPLAY_ALONE_RATE = 150_000  # trades/s, the feed quiet
HAND_BACK_BASE_S = 5.0            # hand-back within 5 s + backlog / replay rate


class FailoverBenchError(RuntimeError):
    """The benchmark could not run; the text says why in one line."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise FailoverBenchError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def percentiles(values) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(share):
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


# --- the rig ------------------------------------------------------------------------------------

class Rig(SimulatedStack):
    """Stand-in primary, simulator, the supervised stack (and a second server for MultiDBClient)."""

    def __init__(self):
        super().__init__("bf-fo-")
        self.second_server = None

    def start(self, rate: float) -> None:
        self.start_primary()
        self.start_simulator(rate, SIM_SEND_BUFFER)
        try:
            self.start_stack(CONNECT_TIMEOUT_S)
        except StackError as exc:
            raise FailoverBenchError(str(exc))
        self.sim.resume()

    def start_second(self) -> RedisProcess:
        self.second_server = self.start_extra_server("second")
        return self.second_server


def writer_state(local) -> str:
    value = local.hget(keys.WRITER_STATE, "state")
    return value.decode() if value else PRIMARY


def last_id(client) -> int:
    value = client.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else -1


def writer_primary_errors(local) -> int:
    beat = read_heartbeats(local, ("writer",)).get("writer") or {}
    return int(beat.get("primary_errors") or 0)


def settle(rig: Rig) -> int:
    """Wait until the writer is on the primary and the primary holds every trade generated so far."""
    wait_until(lambda: writer_state(rig.local) == PRIMARY, SETTLE_TIMEOUT_S,
               "the writer to be on the primary")
    target = rig.sim.status()["last_id"]
    wait_until(lambda: last_id(rig.primary) >= target, SETTLE_TIMEOUT_S,
               f"the primary to reach trade {target:,}")
    return target


def wait_answering(server: RedisProcess, timeout_s: float) -> int:
    """Poll a restored server with short timeouts until it answers PING; the time (ms) it did."""
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        def answers():
            try:
                return client.ping()
            except redis.RedisError:
                return False
        wait_until(answers, timeout_s, f"the primary on port {server.port} to answer", 0.005)
        return now_ms()
    finally:
        client.close()


def events_since(local, since_ms: int, names) -> dict:
    """The first event of each name recorded at or after since_ms (oldest first)."""
    found = {}
    for event in reversed(recent_events(local, 500)):
        if event["ts"] >= since_ms and event["event"] in names and event["event"] not in found:
            found[event["event"]] = event
    return found


# --- reading durable times back from stream entry ids --------------------------------------------

def entry_times(client, stream: str, start_ms: int) -> dict:
    """trade id -> (entry time ms, exchange ts ms) for the stream's entries from start_ms on.

    An entry id's first part is the writing server's clock when the apply script ran, so it is
    the moment the trade became durable there (AOF written before the reply).
    """
    raw = redis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XRANGE", lambda response, **options: response)
    out, start = {}, f"{start_ms}-0"
    while True:
        chunk = raw.xrange(stream, min=start, max="+", count=STREAM_CHUNK)
        if not chunk:
            return out
        for entry_id, fields in chunk:
            ms = int(_text(entry_id).partition("-")[0])
            if fields[0] == b"id" and fields[8] == b"ts":
                trade_id, ts = int(fields[1]), int(fields[9])
            else:
                named = dict(zip(fields[::2], fields[1::2]))
                trade_id, ts = int(named[b"id"]), int(named[b"ts"])
            if trade_id not in out:
                out[trade_id] = (ms, ts)
        start = "(" + _text(chunk[-1][0])


def durable_map(local, primary, start_ms: int) -> dict:
    """trade id -> (first durable time ms, ts, 'local' | 'primary'): the earlier of the two copies."""
    stream = keys.trades(SOURCE)
    durable = {tid: (ms, ts, "local") for tid, (ms, ts) in entry_times(local, stream, start_ms).items()}
    for tid, (ms, ts) in entry_times(primary, stream, start_ms).items():
        known = durable.get(tid)
        if known is None or ms <= known[0]:
            durable[tid] = (ms, ts, "primary")
    return durable


def largest_gap(times_ms) -> tuple:
    """(gap ms, start ms) of the longest stretch without a new durable trade."""
    ordered = sorted(times_ms)
    best = (0, ordered[0] if ordered else 0)
    for before, after in zip(ordered, ordered[1:]):
        if after - before > best[0]:
            best = (after - before, before)
    return best


class OtherCpu:
    """CPU used by processes not part of this run (another benchmark, a test run), in % of one core."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self._start = None

    def _ours(self) -> set:
        pids = {os.getpid()}
        roots = [psutil.Process()]
        supervisord = self.rig.stack.supervisord_pid() if self.rig.stack is not None else None
        try:
            if supervisord:
                roots.append(psutil.Process(supervisord))
                pids.add(supervisord)
            for root in roots:
                pids.update(child.pid for child in root.children(recursive=True))
        except psutil.Error:
            pass
        return pids

    def _sample(self) -> tuple:
        ours, seconds = self._ours(), {}
        for proc in psutil.process_iter(["cpu_times", "create_time"]):
            times = proc.info["cpu_times"]
            if proc.pid in ours or times is None:
                continue
            seconds[(proc.pid, proc.info["create_time"])] = times.user + times.system
        return time.monotonic(), seconds

    def begin(self) -> None:
        self._start = self._sample()

    def end(self):
        if self._start is None:
            return None
        (t0, before), (t1, after) = self._start, self._sample()
        used = sum(value - before.get(key, 0.0) for key, value in after.items())
        return 100.0 * max(used, 0.0) / max(t1 - t0, 1e-6)


# --- 1. a fault and its failover window ----------------------------------------------------------

def measure_fault(rig: Rig, kind: str, outage_s: float, companion=None) -> dict:
    """Kill (then restart) or freeze (then thaw) the primary; time the writer and every trade."""
    settle(rig)
    errors_before = writer_primary_errors(rig.local)
    if companion is not None:
        companion.start()
        time.sleep(MULTIDB_LEAD_S)
    t_fault = now_ms()
    started = time.monotonic()
    if kind == "kill":
        rig.primary_server.kill()
    else:
        rig.primary_server.freeze()
    failover_seen = None
    while time.monotonic() - started < outage_s:
        if failover_seen is None and writer_state(rig.local) != PRIMARY:
            failover_seen = now_ms()
        time.sleep(POLL_S)
    if kind == "kill":
        rig.primary_server.start()     # with its AOF; returns once it answers PING
        t_restored = t_healthy = now_ms()
    else:
        rig.primary_server.thaw()
        t_restored = now_ms()
        t_healthy = wait_answering(rig.primary_server, 30)
    restored_mono = time.monotonic()
    states = {}

    def handed_back():
        state = writer_state(rig.local)
        states.setdefault(state, now_ms())
        return state == PRIMARY
    wait_until(handed_back, HAND_BACK_TIMEOUT_S, f"the hand-back after the {kind}", POLL_S)
    t_hand_back_seen = states[PRIMARY]
    if companion is not None:
        time.sleep(max(0.0, MULTIDB_TAIL_S - (time.monotonic() - restored_mono)))
        companion.stop()
    settle(rig)
    events = events_since(rig.local, t_fault, ("failover", "primary_unhealthy", "reseed_start", "reseed_done",
                                               "drain_start", "hand_back"))
    t_hand_back = events["hand_back"]["ts"] if "hand_back" in events else t_hand_back_seen
    durable = durable_map(rig.local, rig.primary, t_fault - LOOKBACK_MS)

    in_fault = {tid: v for tid, v in durable.items() if t_fault <= v[1] <= t_hand_back}
    waits = [(ms - ts) / 1000.0 for ms, ts, _ in in_fault.values()]
    holes = 0
    if in_fault:
        low, high = min(in_fault), max(in_fault)
        holes = sum(1 for tid in range(low, high + 1) if tid not in durable)
    first_local = min((ms for ms, ts, where in durable.values() if where == "local" and ms >= t_fault),
                      default=None)
    window = [ms for ms, ts, _ in durable.values() if t_fault - 1000 <= ms <= t_hand_back + 1000]
    gap_ms, gap_start = largest_gap(window) if window else (None, None)
    # The trades the exchange printed while the primary was away; for the comparison with MultiDBClient.
    outage_ids = [tid for tid, v in durable.items() if t_fault <= v[1] < t_restored]
    outage_local = sum(1 for tid in outage_ids if durable[tid][2] == "local")
    outage_nowhere = 0
    if outage_ids:
        outage_nowhere = sum(1 for tid in range(min(outage_ids), max(outage_ids) + 1) if tid not in durable)
    return {
        "kind": kind, "outage_s": outage_s, "t_fault": t_fault, "t_restored": t_restored,
        "t_healthy": t_healthy,
        "t_hand_back": t_hand_back, "t_hand_back_seen": t_hand_back_seen, "failover_seen": failover_seen,
        "states": states, "events": events, "waits": percentiles(waits), "holes": holes,
        "first_local_s": None if first_local is None else (first_local - t_fault) / 1000.0,
        "gap_s": None if gap_ms is None else gap_ms / 1000.0,
        "gap_from_fault_s": None if gap_start is None else (gap_start - t_fault) / 1000.0,
        "outage_ids": outage_ids, "outage_local": outage_local, "outage_nowhere": outage_nowhere,
        "primary_errors": writer_primary_errors(rig.local) - errors_before,
    }


# --- 2. replay of a large backlog ----------------------------------------------------------------

def count_backlog(local) -> tuple:
    """(trades, entries) in the backlog: its own exact count (storage/backlog.py), not a scan."""
    return backlog.held_trades(local), local.xlen(keys.BACKLOG)


def measure_replay(rig: Rig, rate: float, others: OtherCpu) -> dict:
    settle(rig)
    base = last_id(rig.primary)
    primary_len_before = rig.primary.xlen(keys.trades(SOURCE))
    t_freeze = now_ms()
    started = time.monotonic()
    rig.primary_server.freeze()
    # The exchange prints a burst; every trade of it goes through ingest and the writer into the
    # backlog at whatever pace they manage (the rest waits in the simulator's send buffer).
    rig.sim.set_rate(REPLAY_SIM_RATE)
    goal = int(REPLAY_BACKLOG_TRADES * REPLAY_BUILD_MARGIN)
    while rig.sim.status()["last_id"] - base < goal and time.monotonic() - started < REPLAY_BUILD_TIMEOUT_S:
        time.sleep(0.05)
    if rate:
        rig.sim.set_rate(rate)
    else:
        rig.sim.pause()           # the replay alone: nothing new while it runs
    build_s = time.monotonic() - started
    target = rig.sim.status()["last_id"]
    wait_until(lambda: last_id(rig.local) >= target, REPLAY_CATCH_UP_TIMEOUT_S,
               f"ingest to land trade {target:,} locally after the burst")
    frozen_s = time.monotonic() - started
    built = last_id(rig.local) - base
    backlog_trades, backlog_entries = count_backlog(rig.local)
    t_thaw = now_ms()
    others.begin()
    rig.primary_server.thaw()
    t_healthy = wait_answering(rig.primary_server, 30)
    seen = {}
    lengths = {}

    def handed_back():
        state = writer_state(rig.local)
        if state not in seen:
            seen[state] = now_ms()
            if state in (DRAINING, PRIMARY):
                lengths[state] = rig.primary.xlen(keys.trades(SOURCE))
        return state == PRIMARY
    wait_until(handed_back, HAND_BACK_TIMEOUT_S, "the hand-back after the replay", POLL_S)
    others_pct = others.end()
    events = events_since(rig.local, t_freeze, ("failover", "drain_start", "hand_back", "drain_failed",
                                                "reseed_done"))
    settle(rig)
    return {"t_freeze": t_freeze, "t_thaw": t_thaw, "t_healthy": t_healthy, "seen": seen, "lengths": lengths,
            "events": events, "build_s": build_s, "built": built, "frozen_s": frozen_s,
            "backlog_trades": backlog_trades, "backlog_entries": backlog_entries,
            "primary_len_before": primary_len_before, "others_pct": others_pct}


# --- 3. redis-py's MultiDBClient through the same fault ------------------------------------------

class LogCapture(logging.Handler):
    """Keeps redis-py's own log records (its failover notices) with their time, prints nothing."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((int(record.created * 1000), record.levelname, record.getMessage()))


def multidb_unavailable():
    """Why redis.multidb cannot be used here ('' if it can)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import redis.multidb.client  # noqa: F401
            import redis.multidb.config  # noqa: F401
    except ImportError as exc:
        return (f"redis.multidb cannot be imported ({exc}); it needs redis-py's circuit-breaker extra "
                f"(pybreaker)")
    return ""


class MultiDbWriter:
    """redis-py's MultiDBClient at library defaults: the primary (weight 1.0) and a second server
    (weight 0.5). One XADD per trade with a unique seq, on the feed's schedule; a write that raises
    is counted and the trade is not written (there is nothing to replay it from)."""

    def __init__(self, primary_url: str, second_url: str, rate: float):
        from redis.multidb.client import MultiDBClient
        from redis.multidb.config import DatabaseConfig, MultiDbConfig
        self.capture = LogCapture()
        self.logger = logging.getLogger("redis")
        self.logger_level = self.logger.level
        self.logger.addHandler(self.capture)
        self.logger.setLevel(logging.INFO)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # "MultiDBClient is an experimental ..."
            self.config = MultiDbConfig(databases_config=[DatabaseConfig(weight=1.0, from_url=primary_url),
                                                          DatabaseConfig(weight=0.5, from_url=second_url)])
            self.client = MultiDBClient(self.config)
        cfg = self.config
        self.settings = (
            f"health check every {cfg.health_check_interval:g} s ({cfg.health_check_probes} PINGs "
            f"{cfg.health_check_delay:g} s apart, {cfg.health_check_timeout:g} s timeout), "
            f"{cfg.command_retry.get_retries()} command retries with jittered backoff, circuit trips at "
            f"{cfg.min_num_failures:,} failures in {cfg.failures_detection_window:g} s, grace period "
            f"{cfg.databases_config[0].grace_period:g} s, auto-fallback every "
            f"{cfg.auto_fallback_interval:g} s, socket timeout "
            f"{cfg.databases_config[0].client_kwargs.get('socket_timeout') or 'none'}")
        self.rate = rate
        self.due = array.array("d")
        self.done = array.array("d")
        self.ok = bytearray()
        self.errors = collections.Counter()
        self.error_text = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="multidb-writer", daemon=True)
        self.closed = False

    def start(self) -> None:
        self.client.initialize()
        self.thread.start()

    def _run(self) -> None:
        begin = time.time()
        seq = 0
        while not self.stopping.is_set():
            due = begin + seq / self.rate
            ahead = due - time.time()
            if ahead > 0.002:
                time.sleep(ahead)
            try:
                self.client.xadd(MULTIDB_KEY, {"seq": seq, "due": int(due * 1000)})
                ok = 1
            except Exception as exc:  # the figure is what the library raises to its user
                ok = 0
                name = type(exc).__name__
                self.errors[name] += 1
                self.error_text.setdefault(name, " ".join(str(exc).split())[:90])
            self.due.append(due)
            self.done.append(time.time())
            self.ok.append(ok)
            seq += 1

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(MULTIDB_JOIN_S)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop()
        try:
            self.client.close()
        except Exception:
            pass
        self.logger.removeHandler(self.capture)
        self.logger.setLevel(self.logger_level)


def stream_seqs(client, key: str) -> collections.Counter:
    counts = collections.Counter()
    start = "-"
    while True:
        chunk = client.xrange(key, min=start, max="+", count=STREAM_CHUNK)
        if not chunk:
            return counts
        for _, fields in chunk:
            counts[int(fields[b"seq"])] += 1
        start = "(" + _text(chunk[-1][0])


def multidb_figures(writer: MultiDbWriter, fault: dict, primary, second) -> dict:
    """Where MultiDBClient's writes went, counted in both servers at the end of the run."""
    in_primary = stream_seqs(primary, MULTIDB_KEY)
    in_second = stream_seqs(second, MULTIDB_KEY)
    t_fault, t_restored = fault["t_fault"] / 1000.0, fault["t_restored"] / 1000.0
    end = fault["t_hand_back"] / 1000.0
    periods = {"before": [], "outage": [], "after": []}
    for seq, due in enumerate(writer.due):
        key = "before" if due < t_fault else "outage" if due < t_restored else "after"
        periods[key].append(seq)

    def where(seqs):
        p = sum(1 for s in seqs if in_primary[s])
        s2 = sum(1 for s in seqs if in_second[s])
        neither = sum(1 for s in seqs if not in_primary[s] and not in_second[s])
        dup = sum(1 for s in seqs if in_primary[s] + in_second[s] > 1)
        errors = sum(1 for s in seqs if not writer.ok[s])
        return {"offered": len(seqs), "primary": p, "second": s2, "neither": neither, "duplicated": dup,
                "errors": errors}

    ok_done = [writer.done[s] for s in range(len(writer.ok)) if writer.ok[s]]
    around = [t for t in ok_done if t_fault - 1.0 <= t <= max(end, t_restored) + MULTIDB_TAIL_S]
    gap = largest_gap([int(t * 1000) for t in around]) if around else (None, None)
    in_fault = [s for s, due in enumerate(writer.due) if t_fault <= due <= end]
    waits = [writer.done[s] - writer.due[s] for s in in_fault if writer.ok[s]]
    failover_note = next(((ms - fault["t_fault"]) / 1000.0 for ms, level, text in writer.capture.records
                          if "Failover has been initiated" in text and ms >= fault["t_fault"]), None)
    last = max(range(len(writer.ok)), key=lambda s: s if writer.ok[s] else -1, default=None)
    last_where = None
    if last is not None and writer.ok[last]:
        last_where = "primary" if in_primary[last] else "second" if in_second[last] else "neither"
    return {"periods": {name: where(seqs) for name, seqs in periods.items()},
            "gap_s": None if gap[0] is None else gap[0] / 1000.0,
            "gap_from_fault_s": None if gap[1] is None else gap[1] / 1000.0 - t_fault,
            "errors": dict(writer.errors), "error_text": dict(writer.error_text),
            "waits": percentiles(waits), "in_fault": len(in_fault), "failover_after_s": failover_note,
            "last_write_went_to": last_where, "written": len(writer.ok),
            "in_primary_total": sum(in_primary.values()), "settings": writer.settings,
            "in_second_total": sum(in_second.values())}


# --- 4. exactness --------------------------------------------------------------------------------

def final_exactness(rig: Rig) -> dict:
    rig.sim.pause()
    final_id = rig.sim.status()["last_id"]
    wait_until(lambda: writer_state(rig.local) == PRIMARY, SETTLE_TIMEOUT_S,
               "the writer to be on the primary")
    wait_until(lambda: last_id(rig.primary) >= final_id, SETTLE_TIMEOUT_S,
               f"the primary to reach trade {final_id:,}")
    verdict = verify_primary(rig.primary, rig.sim)
    return {"verdict": verdict, "last_id": final_id}


# --- the run -------------------------------------------------------------------------------------

def run_failover_bench(outage_s: float = 4.0, rate: float = 2000, echo=print) -> int:
    """Run the failover benchmark and print the figures; 0 if it ran (targets met or not), 1 if not."""
    problem = _preflight(outage_s, rate)
    if problem:
        echo(f"bench-failover: cannot run: {problem}")
        return 1
    run_started = time.monotonic()
    load_before = os.getloadavg()
    rig = Rig()
    writer = None
    ok = False
    result = {}
    try:
        echo(f"bench-failover: working in {rig.root}")
        echo("bench-failover: starting the stand-in primary, the simulator and the supervised stack ...")
        rig.start(rate)
        whole_run = OtherCpu(rig)
        whole_run.begin()
        time.sleep(WARMUP_S)
        mdb_problem = multidb_unavailable()
        if not mdb_problem:
            second = rig.start_second()
            writer = MultiDbWriter(rig.primary_server.url, second.url, rate)
        echo(f"bench-failover: 1. SIGKILL of the primary for {outage_s:g} s"
             + (" (MultiDBClient writing through the same fault) ..." if writer else " ..."))
        result["kill"] = measure_fault(rig, "kill", outage_s, companion=writer)
        if writer is not None:
            writer.close()     # its health checks must not touch the primary during the later faults
        echo(f"bench-failover: 1. SIGSTOP of the primary for {outage_s:g} s ...")
        result["stop"] = measure_fault(rig, "stop", outage_s)
        echo(f"bench-failover: 2. replay: primary frozen, simulator at {REPLAY_SIM_RATE:,}/s until "
             f"{REPLAY_BACKLOG_TRADES:,}+ trades are behind ...")
        result["replay"] = measure_replay(rig, rate, OtherCpu(rig))
        echo("bench-failover: 2b. replay alone: the same burst, the simulator quiet during the replay ...")
        result["replay_alone"] = measure_replay(rig, 0, OtherCpu(rig))
        rig.sim.set_rate(rate)
        rig.sim.resume()
        echo("bench-failover: 4. pausing the simulator; checking every id in the primary ...")
        result["exact"] = final_exactness(rig)
        result["others_pct"] = whole_run.end()
        if writer is not None:
            result["multidb"] = multidb_figures(writer, result["kill"], rig.primary,
                                                rig.second_server.client())
        result["multidb_problem"] = mdb_problem
        ok = True
    except (FailoverBenchError, StackError, SimulatorError, redis.RedisError, OSError, xmlrpc.client.Error,
            RuntimeError) as exc:
        echo(f"bench-failover: could not run: {_one_line(exc)}")
        return 1
    except KeyboardInterrupt:
        echo("bench-failover: interrupted; tearing down")
        return 1
    except Exception as exc:  # the command promises one readable line, not a traceback
        echo(f"bench-failover: could not run: {type(exc).__name__}: {_one_line(exc)}")
        return 1
    finally:
        if writer is not None:
            writer.close()
        rig.close(keep=not ok)
        if not ok:
            echo(f"bench-failover: logs kept in {rig.root}")
    report(echo, rate, outage_s, result, load_before, os.getloadavg(), time.monotonic() - run_started)
    return 0


def _preflight(outage_s: float, rate: float):
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH"
    if not 0 < rate <= MAX_RATE:
        return f"--rate must be above 0 and at most {MAX_RATE:,.0f} (the simulator's maximum)"
    if rate > REPLAY_SIM_RATE:
        return f"--rate must be at most {REPLAY_SIM_RATE:,} (the replay phase builds its backlog faster)"
    if not 0.5 <= outage_s <= 120:
        return "--seconds must be between 0.5 and 120"
    return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


# --- the report ----------------------------------------------------------------------------------

WIDTH = 108


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _s(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} s"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def _since(event: dict, start_ms: int):
    return None if not event else (event["ts"] - start_ms) / 1000.0


def _para(echo, text: str, indent: str = "   ", more: str = None) -> None:
    """One paragraph, wrapped to the report's width."""
    for line in textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=more or indent):
        echo(line)


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return "redis-server"
    for part in out.split():
        if part.startswith("v="):
            return "redis-server " + part[2:]
    return "redis-server"


def report(echo, rate, outage_s, r, load_before, load_after, elapsed) -> None:
    echo("")
    echo(f"btcfeed bench-failover  ({psutil.cpu_count()} cores, Python {platform.python_version()}, "
         f"{_redis_version()}, redis-py {redis.__version__}, default settings, {SOURCE})")
    others_run, others_replay = r.get("others_pct"), r["replay"].get("others_pct")
    _para(echo, f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; processes not part of "
                f"this run used {_pct(others_run)} of one core over the run, {_pct(others_replay)} "
                f"during the replay drain.", indent="")
    noisy = [pct for pct in (others_run, others_replay) if pct is not None]
    if noisy and max(noisy) > NOISY_OTHER_PCT:
        echo(f"WARNING: other processes used more than {NOISY_OTHER_PCT:g}% of a core: the figures are "
             f"pessimistic")
    _para(echo, "Every time below is read on one host clock: a trade's exchange time `ts` against the "
                "entry id (server time) of the first stream that stored it, the local failover copy or "
                "the primary.", indent="")
    echo("=" * WIDTH)
    echo(f"1. failover window at {rate:,.0f} trades/s, {outage_s:g} s outage; trades whose `ts` falls "
         f"between the fault and the hand-back")
    kill_ok = _fault_lines(echo, f"SIGKILL, restarted with its AOF after {outage_s:g} s", r["kill"],
                           TARGET_P99_KILL_S)
    stop_ok = _fault_lines(echo, f"SIGSTOP (a black hole), SIGCONT after {outage_s:g} s", r["stop"],
                           TARGET_P99_STOP_S)
    echo("")
    replay = _replay_lines(echo, rate, r["replay"], f"2. replay of a large backlog beside the live feed "
                                                    f"({rate:,.0f}/s)", TARGET_REPLAY_RATE)
    echo("")
    alone = _replay_lines(echo, 0, r["replay_alone"], "2b. replay of a large backlog alone (the "
                          "simulator quiet once the burst has landed)", TARGET_REPLAY_ALONE_RATE)
    echo("")
    mdb = r.get("multidb")
    if mdb is None:
        _para(echo, f"3. side by side with redis-py's MultiDBClient: not run: "
                    f"{r.get('multidb_problem') or 'unavailable'}", indent="", more="   ")
        mdb_line = "MultiDBClient not run"
    else:
        _side_by_side(echo, rate, outage_s, r["kill"], mdb, r["exact"])
        out = mdb["periods"]["outage"]
        mdb_line = (f"MultiDBClient side by side: outage {_s(mdb['gap_s'], 2)} vs "
                    f"{_s(r['kill']['gap_s'], 2)}, {out['primary']:,} of {out['offered']:,} outage writes "
                    f"in the primary")
    echo("")
    v = r["exact"]["verdict"]
    exact_ok = v.exact()
    echo(f"4. exactness of the whole run in the primary (simulator paused at id {r['exact']['last_id']:,}; "
         f"verify_primary)")
    echo(f"   expected {v.expected:,}  present {v.present:,}  missing {len(v.missing):,}  duplicated "
         f"{len(v.duplicated):,}  unexpected {len(v.unexpected):,}  mismatched {len(v.mismatched):,}   "
         f"{'OK' if exact_ok else 'FAIL'}")
    if not exact_ok:
        _para(echo, str(v))
    echo("")
    kill_p99, stop_p99 = _s(r["kill"]["waits"]["p99"]), _s(r["stop"]["waits"]["p99"])
    _para(echo, f"targets: SIGKILL p99 {_verdict(kill_ok)} ({kill_p99} <= {TARGET_P99_KILL_S:g} s) | "
                f"SIGSTOP p99 {_verdict(stop_ok)} ({stop_p99} <= {TARGET_P99_STOP_S:g} s) | "
                f"replay {_verdict(replay['rate_ok'])} ({replay['rate']:,.0f}/s >= "
                f"{TARGET_REPLAY_RATE:,}/s) | replay alone {_verdict(alone['rate_ok'])} "
                f"({alone['rate']:,.0f}/s >= {TARGET_REPLAY_ALONE_RATE:,}/s) | "
                f"hand-back {_verdict(replay['back_ok'])} "
                f"({replay['back_s']:.2f} s <= "
                f"{replay['allowed_s']:.2f} s) | exactness {'OK' if exact_ok else 'FAIL'} | {mdb_line} | "
                f"run took {elapsed:.0f} s", indent="", more="         ")


def _fault_lines(echo, label: str, f: dict, target_s: float) -> bool:
    w, ev = f["waits"], f["events"]
    passed = w["p99"] is not None and w["p99"] <= target_s and f["holes"] == 0
    echo(f"   {label}:")
    echo(f"     time-to-durable of {w['n']:,} trades: p50 {_s(w['p50'])}  p99 {_s(w['p99'])}  "
         f"max {_s(w['max'])}   target p99 <= {target_s:g} s  {_verdict(passed)}")
    if f["holes"]:
        echo(f"     {f['holes']:,} trades in that id range are durable nowhere")
    echo(f"     detection: first trade durable locally {_s(f['first_local_s'])} after the fault "
         f"(the writer's failover event: {_s(_since(ev.get('failover'), f['t_fault']))})")
    start = "n/a" if f["gap_from_fault_s"] is None else f"{f['gap_from_fault_s']:+.3f} s"
    echo(f"     longest stretch with no trade becoming durable anywhere: {_s(f['gap_s'])}, "
         f"from fault {start}")
    echo(f"     primary answering again {_s((f['t_healthy'] - f['t_fault']) / 1000.0)} after the fault; from "
         f"then: drain start {_s(_since(ev.get('drain_start'), f['t_healthy']))}, hand-back "
         f"{_s((f['t_hand_back'] - f['t_healthy']) / 1000.0)}")
    if "reseed_done" in ev:
        rs = ev["reseed_done"]["fields"]
        _para(echo, f"re-seed before the drain ({rs.get('reason')}): the whole local copy sent again, "
                    f"{rs.get('trades_checked', 0):,} trades, {rs.get('trades_added', 0):,} of them "
                    f"added, in {rs.get('seconds')} s", indent="     ", more="       ")
    if "hand_back" in ev:
        hb = ev["hand_back"]["fields"]
        _para(echo, f"hand_back event: {hb.get('replayed_trades', 0):,} backlog trades replayed in "
                    f"{hb.get('drain_s')} s ({hb.get('replay_rate', 0):,}/s); primary errors the writer "
                    f"absorbed: {f['primary_errors']}", indent="     ", more="       ")
    return passed


def _replay_lines(echo, rate, rp: dict, title: str, target_rate: int) -> dict:
    ev, seen, lengths = rp["events"], rp["seen"], rp["lengths"]
    backlog = rp["backlog_trades"]
    echo(title)
    _para(echo, f"built: the primary SIGSTOPped, the simulator printed a burst at {REPLAY_SIM_RATE:,}/s for "
                f"{rp['build_s']:.1f} s, then {rate:,.0f}/s, until ingest and the writer had landed "
                f"every trade locally: {rp['frozen_s']:.1f} s frozen, "
                f"{rp['built'] / max(rp['frozen_s'], 1e-9):,.0f} trades/s into the local copy and the "
                f"backlog")
    reached = "reached" if backlog >= REPLAY_BACKLOG_TRADES else "NOT reached"
    echo(f"   backlog at SIGCONT: {backlog:,} trades in {rp['backlog_entries']:,} entries (goal "
         f"{REPLAY_BACKLOG_TRADES:,}: {reached})")
    hb = ev.get("hand_back", {}).get("fields", {})
    event_rate = hb.get("replay_rate") or 0
    if hb:
        echo(f"   sync's hand_back event: {hb.get('replayed_trades', 0):,} trades replayed in "
             f"{hb.get('drain_s')} s = {event_rate:,}/s   target >= {target_rate:,}/s  "
             f"{_verdict(event_rate >= target_rate)}")
    else:
        echo("   sync recorded no hand_back event for this drain")
    own_rate = None
    if DRAINING in seen and PRIMARY in seen:
        drain_s = (seen[PRIMARY] - seen[DRAINING]) / 1000.0
        own_rate = backlog / max(drain_s, 1e-9)
        grew = lengths[PRIMARY] - lengths[DRAINING]
        _para(echo, f"own timing: states draining -> primary seen {drain_s:.3f} s apart; backlog at "
                    f"SIGCONT / that = {own_rate:,.0f}/s; the primary's trade stream grew by {grew:,} "
                    f"meanwhile ({grew / max(drain_s, 1e-9):,.0f}/s)")
    else:
        echo(f"   own timing: the draining state was not seen (seen: {', '.join(seen)})")
    back_s = ((seen.get(PRIMARY) or rp["t_healthy"]) - rp["t_healthy"]) / 1000.0
    allowed = HAND_BACK_BASE_S + backlog / TARGET_REPLAY_RATE
    back_ok = PRIMARY in seen and back_s <= allowed
    echo(f"   primary answering again -> drain start {_s(_since(ev.get('drain_start'), rp['t_healthy']))}, "
         f"-> hand-back {back_s:.3f} s")
    measured = event_rate or own_rate
    alternative = (f" (with the measured rate instead: {HAND_BACK_BASE_S + backlog / measured:.2f} s)"
                   if measured else "")
    echo(f"   hand-back target <= {HAND_BACK_BASE_S:g} s + backlog / {TARGET_REPLAY_RATE:,}/s = "
         f"{allowed:.2f} s  {_verdict(back_ok)}{alternative}")
    return {"rate": event_rate, "rate_ok": event_rate >= target_rate, "back_s": back_s,
            "allowed_s": allowed, "back_ok": back_ok}


def _side_by_side(echo, rate, outage_s, kill, mdb, exact) -> None:
    v = exact["verdict"]
    missing, duplicated = set(v.missing), set(v.duplicated)
    outage_ids = kill["outage_ids"]
    lost = sum(1 for tid in outage_ids if tid in missing)
    dup = sum(1 for tid in outage_ids if tid in duplicated)
    out, after = mdb["periods"]["outage"], mdb["periods"]["after"]
    back_s = (kill["t_restored"] - kill["t_fault"]) / 1000.0
    echo(f"3. side by side: the SIGKILL of part 1 ({outage_s:g} s, restarted with its AOF {back_s:.2f} s "
         f"after the kill), {rate:,.0f} trades/s")
    _para(echo, f"redis-py MultiDBClient at library defaults: {mdb['settings']}. Databases: the primary "
                f"(weight 1.0) and a second redis-server (weight 0.5). One XADD per trade with a unique "
                f"seq on the feed's schedule; a write that raises is counted and its trade is not written.")
    width = 48

    def row(name, left, right):
        echo(f"   {name:<{width}} {left:>26} {right:>26}")
    row("", "MultiDBClient", "btcfeed")
    row("write outage (longest stretch, nothing lands)", _s(mdb["gap_s"]), _s(kill["gap_s"]))
    row("errors raised to the user", f"{sum(mdb['errors'].values()):,}", "0")
    mw, kw = mdb["waits"], kill["waits"]
    row("time-to-durable p99 / max, fault -> hand-back", f"{_s(mw['p99'])} / {_s(mw['max'])}",
        f"{_s(kw['p99'])} / {_s(kw['max'])}")
    row("trades offered while the primary was down", f"{out['offered']:,}", f"{len(outage_ids):,}")
    row("  written first to the other database", f"{out['second']:,} (second)",
        f"{kill['outage_local']:,} (local)")
    row("  written nowhere", f"{out['neither']:,}", f"{kill['outage_nowhere']:,}")
    row("  in the primary at the end of the run", f"{out['primary']:,}", f"{len(outage_ids) - lost:,}")
    row("  missing / duplicated in the primary",
        f"{out['offered'] - out['primary']:,} / {out['duplicated']:,}", f"{lost:,} / {dup:,}")
    row(f"after the restart (to {MULTIDB_TAIL_S:g} s): primary / other",
        f"{after['primary']:,} / {after['second']:,}", "primary, after hand-back")
    row("whole run in the primary: missing / duplicated", "-", f"{len(v.missing):,} / {len(v.duplicated):,}")
    errors = ", ".join(f"{n} {name}" for name, n in sorted(mdb["errors"].items(), key=lambda kv: -kv[1]))
    echo(f"   MultiDBClient raised: {errors or 'nothing'}")
    for name, text in mdb["error_text"].items():
        echo(f"     {name}: {text}")
    switched = ("did not switch databases" if mdb["failover_after_s"] is None
                else f"switched to the second database {mdb['failover_after_s']:.2f} s after the kill")
    _para(echo, f"MultiDBClient {switched}; its last write went to {mdb['last_write_went_to']}. At the "
                f"end the primary holds {mdb['in_primary_total']:,} of its {mdb['written']:,} writes and "
                f"the second {mdb['in_second_total']:,}: it has no replay, nothing brings the two together.")
    _para(echo, f"btcfeed: the writer absorbed {kill['primary_errors']} primary error(s) and failed "
                f"over; every trade was durable locally at once, then replayed into the primary exactly "
                f"once.")
