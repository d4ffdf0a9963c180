"""bin/btcfeed bench-availability: what consumers see while the primary, an exchange and the feed's own
processes fail.

The real stack runs with two sources, binance:BTCUSDT (~1,000 trades/s) and coinbase:BTC-USD (~300
trades/s), both from the exchange simulator, the price view following binance first, coinbase next.
Three consumers run, each in its own process:
  client  the Python client: Feed(primary, api_urls=[the host's API], source=binance) with follow()
          (every trade) and, in a second thread, price() polled every 100 ms;
  sse     an SSE reader of /v1/stream?source=binance on the host's API, which reconnects after any
          error, end of stream or 20 s of silence, resuming with Last-Event-ID = the last id it got;
  naive   for comparison, what a typical omega_ai user does: redis-py (its defaults) against the
          primary, XREAD BLOCK on the binance trades stream from the last entry id read, and HGETALL
          btcfeed:price every 100 ms; on an error it waits 100 ms and tries again.
The schedule (every length multiplied by --scale): calm, primary SIGKILL for 60 s (restarted with its
data), calm, primary black-holed (SIGSTOP) for 30 s, calm, the binance simulator paused for 60 s,
calm, then a SIGKILL of ingest, writer, sync, health and api in turn (supervisord restarts each) with
a calm period after each.

With --hosts 2, a second feed host (a whole stack of its own: local Redis, processes, API) feeds the
same primary from the same exchanges, as two redundant hosts would: the client gets both APIs
(api_urls=[A, B]); the SSE reader keeps one stream open to each host and takes every id once (a
trade arrives from whichever host has it first); the process SIGKILLs hit host A, and the schedule
ends with host A lost entirely (supervisord and every process SIGKILLed) for 30 s, then started again.

Freshness, judged once per 100 ms slot by a sampler in the bench's own process, which reads each
consumer's state (shared memory) at the slot's instant t:
  trades  the consumer's latest trade is its highest binance trade id c. Its lag at t is the age of
          the oldest binance trade it lacks: t - (print time of trade c+1) if the exchange had printed
          c+1 by t, else 0. So while binance is paused, a consumer holding binance's last trade is
          fresh; it is judged against that one source only.
  price   the consumer's latest price is the trade the price view names (its ts, the exchange's
          print time). Its lag at t is N(t) - ts, N(t) being the print time of the newest trade
          printed by t on any source. So while binance is paused the price stays fresh only by
          moving to coinbase: the price view's switch is what is measured.
A slot is fresh when the lag is at most 1,000 ms. Printed per consumer and figure: the share of fresh
slots, the longest stale stretch (consecutive stale slots x 100 ms), and where the stale slots fell
(per phase of the schedule). Exactness: every binance id from the first trade printed after the
measurement started to the last one printed before it ended is looked up in what the consumer
received: missing (never received) and duplicated (received more than once) are counted, id by id
against the simulator's history. Target: >= 99.99% fresh slots for client and sse, 0 missing,
0 duplicated; naive beside them.
"""

import array
import bisect
import multiprocessing
import os
import signal
import socket
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import redis

from btcfeed import keys
from btcfeed.commands.stack import Stack, StackError
from tools.rig import SimulatedStack, isolated_env
from tools.simulator import SimulatorClient, SimulatorError, start_simulator, stop_simulator

BINANCE = "binance:BTCUSDT"
COINBASE = "coinbase:BTC-USD"
BINANCE_RATE = 1000
COINBASE_RATE = 300
SLOT_MS = 100
FRESH_MS = 1000
TARGET_SHARE = 0.9999
PRICE_POLL_S = 0.1
SSE_SILENT_S = 20.0
HOST_DOWN_S = 30.0
FEED_PROCESSES = ("ingest", "writer", "sync", "health", "api")
CONSUMERS = ("client", "sse", "naive")
# (phase name, seconds at --scale 1, fault started at its beginning, undone at its end)
CALM_S = 20.0
AFTER_KILL_S = 15.0


def schedule(scale: float, hosts: int = 1) -> List[tuple]:
    """[(phase, seconds, action)] in order; action names what happens at the phase's start."""
    steps = [("calm", CALM_S, None),
             ("primary SIGKILL", 60.0, "primary_kill"),
             ("calm after primary restart", CALM_S, "primary_restart"),
             ("primary SIGSTOP", 30.0, "primary_stop"), ("calm after SIGCONT", CALM_S, "primary_cont"),
             ("binance paused", 60.0, "binance_pause"),
             ("calm after binance resumed", CALM_S, "binance_resume")]
    where = " on host A" if hosts > 1 else ""
    for name in FEED_PROCESSES:
        steps.append((f"{name} SIGKILL{where}", AFTER_KILL_S, f"kill:{name}"))
    if hosts > 1:
        steps += [("host A lost (every process SIGKILLed)", HOST_DOWN_S, "host_kill"),
                  ("calm after host A started again", CALM_S, "host_start")]
    return [(name, seconds * scale, action) for name, seconds, action in steps]


# --- slot accounting (pure: tested on synthetic timelines) ----------------------------------------

def trade_lags(sample_ms: Sequence[int], latest_ids: Sequence[int], first_id: int,
               print_ms: Sequence[int]) -> List[int]:
    """Per sample: how long the oldest trade the consumer lacks has been printed (0 when it lacks
    none). print_ms[i] is the print time of trade first_id + i; latest_ids the consumer's highest id."""
    lags = []
    for now, latest in zip(sample_ms, latest_ids):
        index = latest + 1 - first_id
        if index < 0:
            index = 0
        lags.append(max(0, now - print_ms[index]) if index < len(print_ms) and print_ms[index] <= now else 0)
    return lags


def newest_print(now_ms: int, sources_print_ms: Sequence[Sequence[int]]) -> Optional[int]:
    """The print time of the newest trade printed by now_ms on any source (each list sorted)."""
    best = None
    for times in sources_print_ms:
        at = bisect.bisect_right(times, now_ms)
        if at and (best is None or times[at - 1] > best):
            best = times[at - 1]
    return best


def price_lags(sample_ms: Sequence[int], price_ts: Sequence[int],
               sources_print_ms: Sequence[Sequence[int]]) -> List[int]:
    """Per sample: how far the price's trade is behind the newest trade printed on any source."""
    lags = []
    for now, ts in zip(sample_ms, price_ts):
        newest = newest_print(now, sources_print_ms)
        lags.append(0 if newest is None else max(0, newest - ts))
    return lags


@dataclass
class Freshness:
    slots: int
    fresh: int
    longest_stale_ms: int
    stale_by_phase: Dict[str, int] = field(default_factory=dict)
    worst_lag_ms: int = 0
    stretches: List[tuple] = field(default_factory=list)   # (phase, slot index in it, stale slots, worst lag)

    @property
    def share(self) -> float:
        return self.fresh / self.slots if self.slots else 0.0

    def line(self) -> str:
        where = ", ".join(f"{name} {count}" for name, count in self.stale_by_phase.items() if count)
        return (f"{100 * self.share:.3f}% fresh ({self.fresh:,}/{self.slots:,} slots), longest stale "
                f"{self.longest_stale_ms / 1000:.1f} s, worst lag {self.worst_lag_ms / 1000:.1f} s"
                + (f"; stale slots: {where}" if where else ""))

    def stretch_lines(self, limit: int = 8, slot_ms: int = SLOT_MS) -> List[str]:
        """Where each stale stretch began (its phase, seconds into it), how long it was, its worst lag."""
        return [f"stale {count * slot_ms / 1000:.1f} s from {start * slot_ms / 1000:.1f} s into '{phase}' "
                f"(worst lag {worst / 1000:.2f} s)" for phase, start, count, worst in self.stretches[:limit]]


def freshness(lags: Sequence[int], phases: Sequence[str], fresh_ms: int = FRESH_MS,
              slot_ms: int = SLOT_MS) -> Freshness:
    """Fresh slots (lag <= fresh_ms), the longest run of stale slots, and the stale slots per phase."""
    fresh = run = longest = 0
    by_phase: Dict[str, int] = {}
    stretches: List[list] = []
    phase_start, previous = 0, None
    for index, (lag, phase) in enumerate(zip(lags, phases)):
        by_phase.setdefault(phase, 0)
        if phase != previous:
            phase_start, previous = index, phase
        if lag <= fresh_ms:
            fresh += 1
            run = 0
        else:
            if run == 0:
                stretches.append([phase, index - phase_start, 0, 0])
            run += 1
            stretches[-1][2:] = [run, max(stretches[-1][3], lag)]
            longest = max(longest, run)
            by_phase[phase] += 1
    return Freshness(len(lags), fresh, longest * slot_ms, by_phase, max(lags, default=0),
                     [tuple(stretch) for stretch in stretches])


def exactness(received: Sequence[int], first_id: int, last_id: int) -> tuple:
    """(missing, duplicated) among the ids first_id..last_id: never received / received more than once."""
    counts = bytearray(last_id - first_id + 1)
    for trade_id in received:
        if first_id <= trade_id <= last_id and counts[trade_id - first_id] < 2:
            counts[trade_id - first_id] += 1
    return counts.count(0), counts.count(2)


# --- consumers (each in its own process) ------------------------------------------------------------

def _consumer_main(kind: str, primary_url: str, api_urls: List[str], latest, price_ts, stop,
                   ids_path: str) -> None:
    import logging
    logging.basicConfig(filename=ids_path + ".log", level=logging.INFO,
                        format="%(asctime)s.%(msecs)03d %(name)s %(message)s", datefmt="%H:%M:%S")
    received = array.array("q")
    errors = [0]

    taking = threading.Lock()

    def take(trade_id: int) -> None:
        with taking:
            received.append(trade_id)
            if trade_id > latest.value:
                latest.value = trade_id

    feed = None
    if kind == "client":
        # One Feed for both threads, as an application would have: price() asks the backend follow() uses.
        from btcfeed.client import Feed
        feed = Feed(primary_url, api_urls=api_urls, source=BINANCE)
    if kind == "sse":
        # One stream per host; an id is taken once, from whichever host gives it first.
        merged = _FirstSeen(take)
        threads = [threading.Thread(target=_follow_sse, args=(api_url, merged, stop, errors), daemon=True)
                   for api_url in api_urls]
    else:
        follow = {"client": _follow_client, "naive": _follow_naive}[kind]
        threads = [threading.Thread(target=follow, args=(feed, primary_url, take, stop, errors), daemon=True)]
    if kind != "sse":
        threads.append(threading.Thread(target=_poll_price, args=(feed, primary_url, price_ts, stop, errors),
                                        daemon=True))
    for thread in threads:
        thread.start()
    stop.wait()
    time.sleep(0.5)
    with open(ids_path, "wb") as handle:
        received.tofile(handle)


def _follow_client(feed, primary_url, take, stop, errors) -> None:
    from btcfeed.client import FeedUnavailable
    after = None
    while not stop.is_set():
        follower = feed.follow(after)
        stopper = threading.Thread(target=lambda: (stop.wait(), follower.close()), daemon=True)
        stopper.start()
        try:
            for trade in follower:
                take(trade.id)
                after = follower.watermark
        except FeedUnavailable:
            errors[0] += 1
            time.sleep(0.1)


class _FirstSeen:
    """The SSE reader's merge of its streams. Each host's stream is in id order with no hole, so an
    id above the highest taken is new, and one at or below it came first from the other host. An id
    at or below what the same connection gave before (or resumed after) is the host's own duplicate:
    it is taken, so that the exactness check counts it."""

    def __init__(self, take):
        self.take = take
        self.highest = None
        self.lock = threading.Lock()

    def offer(self, trade_id: int, connection_last: Optional[int]) -> None:
        with self.lock:
            if connection_last is not None and trade_id <= connection_last:
                self.take(trade_id)
            elif self.highest is None or trade_id > self.highest:
                self.highest = trade_id
                self.take(trade_id)


def _follow_sse(api_url: str, merged: _FirstSeen, stop, errors) -> None:
    """One host's /v1/stream, reconnecting after any error, end of stream or silence, resuming after
    the highest id taken from any host."""
    host, _, port = api_url.rpartition("//")[2].partition(":")
    while not stop.is_set():
        try:
            sock = socket.create_connection((host, int(port)), timeout=SSE_SILENT_S)
            last_id = merged.highest
            header = f"Last-Event-ID: {last_id}\r\n" if last_id is not None else ""
            sock.sendall(f"GET /v1/stream?source={BINANCE} HTTP/1.0\r\n{header}\r\n".encode())
            buffer = b""
            while not stop.is_set():
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                cut = buffer.rfind(b"\n\n")
                if cut < 0:
                    continue
                block, buffer = buffer[:cut], buffer[cut + 2:]
                for line in block.split(b"\n"):
                    if line.startswith(b"id: "):
                        trade_id = int(line[4:])
                        merged.offer(trade_id, last_id)
                        last_id = trade_id if last_id is None else max(last_id, trade_id)
            sock.close()
        except (OSError, ValueError):
            errors[0] += 1
        time.sleep(0.1)


def _follow_naive(feed, primary_url, take, stop, errors) -> None:
    client = redis.Redis.from_url(primary_url)
    stream, position = keys.trades(BINANCE), "$"
    while not stop.is_set():
        try:
            reply = client.xread({stream: position}, count=1000, block=1000)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    take(int(fields[b"id"]))
                    position = entry_id
        except redis.RedisError:
            errors[0] += 1
            time.sleep(0.1)


def _poll_price(feed, primary_url, price_ts, stop, errors) -> None:
    if feed is not None:
        from btcfeed.client import FeedError

        def read():
            price = feed.price()
            return price.ts if price else None
        failure = FeedError
    else:
        client = redis.Redis.from_url(primary_url)

        def read():
            value = client.hget(keys.PRICE, "ts")
            return int(value) if value else None
        failure = redis.RedisError
    while not stop.wait(PRICE_POLL_S):
        try:
            ts = read()
        except failure:
            errors[0] += 1
            continue
        if ts is not None and ts > price_ts.value:
            price_ts.value = ts


# --- the run --------------------------------------------------------------------------------------

class Rig(SimulatedStack):
    """The simulated rig with a second simulator (coinbase) beside the binance one."""

    def __init__(self, price_stale_ms: Optional[int] = None, hosts: int = 1):
        super().__init__("bf-avail-")
        self.coinbase_process = self.coinbase = None
        self.hosts = hosts
        self.stacks: List[Stack] = []
        self.extra_env = {} if price_stale_ms is None else {"BTCFEED_PRICE_STALE_MS": str(price_stale_ms)}

    def start(self, connect_timeout_s: float = 30) -> None:
        self.start_primary()
        self.start_simulator(BINANCE_RATE, max_send_buffer=1 << 26)
        self.coinbase_process, port = start_simulator(rate=COINBASE_RATE, paused=True, mode="coinbase",
                                                      log_path=os.path.join(self.root, "coinbase.log"))
        self.coinbase = SimulatorClient(f"http://127.0.0.1:{port}")
        for host in range(self.hosts):
            # Each host its own state directory and ports (isolated_env picks free ones).
            env = isolated_env(self.primary_server.url, self.sim.base_url, source=f"{BINANCE},{COINBASE}",
                               BTCFEED_COINBASE_WS_URL=f"ws://127.0.0.1:{port}",
                               BTCFEED_COINBASE_REST_URL=f"http://127.0.0.1:{port}",
                               BTCFEED_PRICE_SOURCES=f"{BINANCE},{COINBASE}", **self.extra_env)
            stack = Stack(self.state_dir if host == 0 else f"{self.state_dir}{host + 1}", env)
            stack.up()
            self.stacks.append(stack)
        self.stack = self.stacks[0]
        self.local = redis.Redis(unix_socket_path=os.path.join(self.state_dir, "redis.sock"),
                                 socket_timeout=30)
        deadline = time.monotonic() + connect_timeout_s
        while (self.sim.status()["connections"] < self.hosts
               or self.coinbase.status()["connections"] < self.hosts):
            if time.monotonic() > deadline:
                raise StackError(f"ingest did not connect to both simulators within {connect_timeout_s:.0f}s")
            time.sleep(0.1)
        self.sim.resume()
        self.coinbase.resume()

    @property
    def api_urls(self) -> List[str]:
        return ["http://" + stack.env["BTCFEED_API_ADDR"] for stack in self.stacks]

    def kill_host(self) -> None:
        """Host A lost at once: supervisord first (so it restarts nothing), then every process it ran."""
        pids = [info["pid"] for info in self.stack.processes() if info["pid"]]
        supervisord = self.stack.supervisord_pid()
        for pid in ([supervisord] if supervisord else []) + pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def act(self, action: Optional[str]) -> None:
        if action is None:
            return
        if action == "primary_kill":
            self.primary_server.kill()
        elif action == "primary_restart":
            self.primary_server.start()
        elif action == "primary_stop":
            self.primary_server.freeze()
        elif action == "primary_cont":
            self.primary_server.thaw()
        elif action == "binance_pause":
            self.sim.pause()
        elif action == "binance_resume":
            self.sim.resume()
        elif action.startswith("kill:"):
            self.stack.kill(action[5:])
        elif action == "host_kill":
            self.kill_host()
        elif action == "host_start":
            self.stack.up()

    def close(self, keep: bool) -> None:
        for stack in self.stacks[1:]:
            try:
                stack.down()
            except (StackError, OSError, xmlrpc.client.Error):
                pass
        super().close(keep)
        if self.coinbase_process is not None:
            stop_simulator(self.coinbase_process)


def _print_times(sim: SimulatorClient, from_id: int, to_id: int, chunk: int = 200_000) -> array.array:
    times = array.array("q")
    for low in range(from_id, to_id + 1, chunk):
        times.extend(row[3] for row in sim.history(low, min(to_id, low + chunk - 1)))
    return times


def run_availability_bench(scale: float = 1.0, price_stale_ms: Optional[int] = None, keep: bool = False,
                           hosts: int = 1, echo=print) -> int:
    steps = schedule(scale, hosts)
    total = sum(seconds for _, seconds, _ in steps)
    echo(f"bench-availability: {hosts} feed host{'s' if hosts > 1 else ''} feeding one primary; "
         f"binance {BINANCE_RATE:,}/s and coinbase {COINBASE_RATE:,}/s; consumers "
         f"{', '.join(CONSUMERS)}; schedule of {total:.0f} s (scale {scale:g}); a slot is fresh when at most "
         f"{FRESH_MS:,} ms behind")
    if price_stale_ms is not None:
        echo(f"bench-availability: BTCFEED_PRICE_STALE_MS={price_stale_ms} (not the default)")
    rig = Rig(price_stale_ms, hosts)
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    shared = {kind: (context.Value("q", -1, lock=False), context.Value("q", 0, lock=False))
              for kind in CONSUMERS}
    processes = {}
    ok = False
    try:
        rig.start()
        wait_until(lambda: rig.primary.hget(keys.PRICE, "ts"), 30, "the first price")
        for kind in CONSUMERS:
            latest, price_ts = shared[kind]
            processes[kind] = context.Process(
                target=_consumer_main, daemon=True, name=f"consumer-{kind}",
                args=(kind, rig.primary_server.url, rig.api_urls, latest, price_ts, stop,
                      os.path.join(rig.root, f"ids-{kind}")))
            processes[kind].start()
        wait_until(lambda: all(shared[k][0].value > 0 for k in CONSUMERS)
                   and all(shared[k][1].value > 0 for k in ("client", "naive")),
                   60, "every consumer's first trade")
        first_id = rig.sim.status()["last_id"] + 1
        first_cb = rig.coinbase.status()["last_id"]
        samples, labels = sample_schedule(rig, steps, shared, echo)
        last_id = rig.sim.status()["last_id"]
        echo(f"bench-availability: schedule done; binance ids {first_id:,}..{last_id:,}; "
             f"letting the consumers catch up ...")
        try:
            wait_until(lambda: all(shared[k][0].value >= last_id for k in CONSUMERS), 60, "every consumer")
        except StackError as exc:
            echo(f"  {exc}")
        stop.set()
        for process in processes.values():
            process.join(30)
        binance_times = _print_times(rig.sim, first_id, rig.sim.status()["last_id"])
        coinbase_times = _print_times(rig.coinbase, first_cb, rig.coinbase.status()["last_id"])
        sample_ms = [s[0] for s in samples]
        echo("")
        met = True
        for kind in CONSUMERS:
            column = CONSUMERS.index(kind)
            lags = trade_lags(sample_ms, [s[1 + 2 * column] for s in samples], first_id, binance_times)
            trades = freshness(lags, labels)
            received = array.array("q")
            with open(os.path.join(rig.root, f"ids-{kind}"), "rb") as handle:
                received.frombytes(handle.read())
            missing, duplicated = exactness(received, first_id, last_id)
            echo(f"{kind:>6} trades: {trades.line()}")
            if kind != "naive":
                for line in trades.stretch_lines():
                    echo(f"{'':>15}{line}")
            echo(f"{'':>6}         ids {first_id:,}..{last_id:,}: "
                 f"{missing:,} missing, {duplicated:,} duplicated")
            if kind != "sse":
                prices = freshness(price_lags(sample_ms, [s[2 + 2 * column] for s in samples],
                                              [binance_times, coinbase_times]), labels)
                echo(f"{kind:>6}  price: {prices.line()}")
                if kind != "naive":
                    for line in prices.stretch_lines():
                        echo(f"{'':>15}{line}")
            if kind != "naive":
                met &= trades.share >= TARGET_SHARE and not missing and not duplicated
                if kind != "sse":
                    met &= prices.share >= TARGET_SHARE
        echo(f"target (client and sse: >= {100 * TARGET_SHARE:.2f}% fresh, 0 missing, 0 duplicated): "
             + ("met" if met else "NOT met"))
        ok = True
        return 0 if met else 1
    except (StackError, SimulatorError, redis.RedisError, OSError, xmlrpc.client.Error) as exc:
        echo(f"bench-availability: could not run: {type(exc).__name__}: {exc}")
        return 2
    finally:
        stop.set()
        for process in processes.values():
            if process.is_alive():
                process.kill()
        rig.close(keep=keep or not ok)
        if keep or not ok:
            echo(f"bench-availability: logs kept in {rig.root}")


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def sample_schedule(rig: Rig, steps, shared, echo) -> tuple:
    """Run the schedule; every SLOT_MS record (time ms, then per consumer latest id and price ts)."""
    samples, labels = [], []
    started = time.monotonic()
    slot = 0
    for name, seconds, action in steps:
        echo(f"  {time.monotonic() - started:6.1f} s  {name} ({seconds:.0f} s)")
        # The fault runs in its own thread so that a slow action never delays a slot.
        threading.Thread(target=_act, args=(rig, action, echo), daemon=True).start()
        end = time.monotonic() + seconds
        while True:
            slot += 1
            due = started + slot * SLOT_MS / 1000
            if due > end:
                slot -= 1
                break
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            row = [int(time.time() * 1000)]
            for kind in CONSUMERS:
                row += [shared[kind][0].value, shared[kind][1].value]
            samples.append(row)
            labels.append(name)
    return samples, labels


def _act(rig: Rig, action, echo) -> None:
    try:
        rig.act(action)
    except (StackError, SimulatorError, OSError, RuntimeError, xmlrpc.client.Error) as exc:
        echo(f"  {action} failed: {type(exc).__name__}: {exc}")
