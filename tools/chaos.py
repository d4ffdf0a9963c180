"""bin/btcfeed chaos: a seeded, randomized fault soak of the real stack, judged id by id at the end.

One fault at a time, each restored before the next: the primary killed, frozen, wiped, demoted to a
replica or out of memory; the primary losing data silently (FLUSHALL, an empty restart faster than
the writer's retry, the tail of its AOF as a host crash loses it); the local Redis or a stack process
SIGKILLed; the exchange's websocket dropped, cut, stalled or fragmented; its REST API refusing with
429. (A Cluster slot migration needs a cluster: tests/deployment/test_cluster.py runs it.) The same
seed gives the same sequence of faults (their timing follows the machine). Afterwards the exchange is
paused, the stack settles, and the primary (and the local copy a re-seed would restore it from) is
compared with the exchange's history, id by id, from the first trade the primary held.
"""

import collections
import json
import os
import random
import shutil
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass

import redis

from btcfeed import keys
from btcfeed.events import EVENTS_MAX, recent_events
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands.stack import PROGRAMS, Stack, StackError
from tools.verify import SOURCE, derived_differences, verify_local_copy, verify_primary
from tools.simulator import MAX_RATE, SimulatorClient, SimulatorError, start_simulator, stop_simulator

EXIT_EXACT, EXIT_NOT_EXACT, EXIT_COULD_NOT_RUN = 0, 1, 2

# The kinds of fault, in the order the schedule draws from (changing it changes every seed's run).
FAULT_KINDS = ("primary-kill", "primary-stop", "primary-wipe", "primary-replica", "primary-oom",
               "local-kill", "ingest-kill", "writer-kill", "sync-kill",
               "ws-drop", "ws-cut", "ws-stall", "ws-fragment", "rest-429",
               "primary-flush", "primary-empty-restart", "primary-aof-tail")
GAP_S = (2.0, 8.0)                  # quiet time before each fault
HOLD_S = {                          # how long a fault lasts before it is restored; absent = one shot
    "primary-kill": (1.0, 4.0),     # down, then restarted with its data (AOF)
    "primary-stop": (1.0, 3.0),     # SIGSTOP: the port stays open, nothing answers
    "primary-wipe": (0.0, 2.0),     # down, data files removed, restarted empty
    "primary-replica": (1.0, 3.0),  # REPLICAOF an empty server (its data is replaced), then NO ONE
    "primary-oom": (1.0, 3.0),      # maxmemory below what it uses
    "ws-stall": (1.0, 2.0),         # the connection delivers nothing (and never those trades)
    "ws-fragment": (1.0, 3.0),      # every message as three frames
    "rest-429": (1.0, 3.0),         # market-data REST refused, with a reconnect that needs it
}
REST_429_COUNT = (2, 6)             # refused REST requests in one burst
AOF_TAIL_LOST = 0.3                 # share of the newest AOF file a host crash takes

STATE_SAMPLE_S = 0.1                # how often the writer state is looked at during a fault
RESTART_WAIT_S = 30.0               # for supervisord to bring a killed program back
FIRST_TRADE_WAIT_S = 30.0           # after `up`, for the first trade to reach the primary
COOL_DOWN_S = 3.0                   # live trades after the last fault, so a gap it left is noticed
SETTLE_WAIT_S = 120.0               # after pausing the exchange, for everything to land
SETTLE_STABLE_S = 3.0               # longer than sync's identity check of a healthy primary
SHOW_IDS = 20                       # ids printed per kind of discrepancy
STACK_EVENTS = ("failover", "primary_changed", "drain_start", "hand_back", "reseed_done", "repair",
                "repair_failed", "drain_failed", "local_memory_full")
SIM_CALL_TIMEOUT_S = 10.0


class SoakAborted(RuntimeError):
    """The soak could not go on injecting faults (the harness, not the stack under test, failed)."""


# What driving the servers, the simulator and supervisord can raise (StackError, SimulatorError and
# SoakAborted are RuntimeErrors).
HARNESS_ERRORS = (RuntimeError, OSError, redis.RedisError, xmlrpc.client.Error)


@dataclass(frozen=True)
class Fault:
    kind: str
    gap_s: float        # quiet time before it
    hold_s: float = 0.0
    count: int = 0      # rest-429: requests refused

    def describe(self) -> str:
        if self.kind == "rest-429":
            return f"{self.kind} x{self.count} {self.hold_s:.1f}s"
        return f"{self.kind} {self.hold_s:.1f}s" if self.kind in HOLD_S else self.kind


def fault_schedule(seed: int):
    """The endless fault sequence of a seed; every step draws the same numbers whatever its kind."""
    rng = random.Random(seed)
    while True:
        gap = rng.uniform(*GAP_S)
        kind = rng.choice(FAULT_KINDS)
        hold = rng.uniform(*HOLD_S.get(kind, (0.0, 0.0)))
        count = rng.randint(*REST_429_COUNT)
        yield Fault(kind, round(gap, 2), round(hold, 2), count if kind == "rest-429" else 0)


def run_chaos(minutes: float, seed: int, rate: float, echo=print) -> int:
    """The `bin/btcfeed chaos` command: 0 exact, 1 not exact (state kept), 2 could not run."""
    return ChaosSoak(minutes, seed, rate, echo).run()


class ChaosSoak:
    """One soak: set up, inject faults for `minutes`, settle, judge, tear down."""

    def __init__(self, minutes: float, seed: int, rate: float, echo=print):
        self.minutes = minutes
        self.seed = seed
        self.rate = rate
        self.echo = echo
        self.root = None
        self.primary = self.other = self.stack = self.local = None
        self.sim = self.sim_process = None
        self.started = 0.0
        self.first_id = None
        self.last_id = None
        self.paused_ms = 0
        self.fault_counts = collections.Counter()
        self.verdict = None
        self.local_verdict = None
        self.derived = []
        self.events = collections.Counter()
        self._states = []

    # --- the whole run ---------------------------------------------------------------------------
    def run(self) -> int:
        problem = self._argument_problem()
        if problem:
            self.echo(f"chaos: cannot run: {problem}")
            return EXIT_COULD_NOT_RUN
        try:
            self.set_up()
        except HARNESS_ERRORS as exc:
            keep = isinstance(exc, (StackError, SoakAborted))
            self.echo(f"chaos: could not run: {_one_line(exc)}"
                      + (f" (state kept in {self.root})" if keep else ""))
            self.tear_down(keep=keep)
            return EXIT_COULD_NOT_RUN
        keep = True
        try:
            aborted = self.inject_faults()
            settled = self.restore_and_settle()
            exact = self.judge(settled)
            keep = not exact
            if exact and aborted:
                self.echo(f"chaos: soak cut short ({aborted}); what ran was exact")
                return EXIT_COULD_NOT_RUN
            return EXIT_EXACT if exact else EXIT_NOT_EXACT
        except HARNESS_ERRORS as exc:
            self.echo(f"chaos: could not finish the soak: {_one_line(exc)}")
            return EXIT_COULD_NOT_RUN
        except KeyboardInterrupt:
            self.echo("chaos: interrupted")
            return EXIT_COULD_NOT_RUN
        finally:
            if keep:
                self._keep_evidence()
            self.tear_down(keep=keep)

    def _argument_problem(self) -> str:
        if not self.minutes > 0:
            return f"--minutes must be positive, got {self.minutes}"
        if not 0 < self.rate <= MAX_RATE:
            return f"--rate must be within (0, {MAX_RATE:.0f}], got {self.rate}"
        if shutil.which("redis-server") is None:
            return "redis-server is not on PATH"
        return ""

    # --- set up and tear down --------------------------------------------------------------------
    def set_up(self) -> None:
        # Short: the local Redis's unix socket lives in here, and socket paths are limited to 108 bytes.
        self.root = tempfile.mkdtemp(prefix="bf-chaos-", dir="/tmp")
        os.makedirs(os.path.join(self.root, "logs"), exist_ok=True)
        self.say(f"chaos: seed {self.seed}, {self.minutes:g} min, {self.rate:g} trades/s; "
                 f"state dir {self.root}")
        self.primary = RedisProcess(os.path.join(self.root, "primary")).start()
        # The server the primary is made a replica of: empty, and it serves the full sync at once
        # (no diskless-sync delay), so the demoted primary really loses its data, keeping its run_id.
        self.other = RedisProcess(os.path.join(self.root, "other"), appendonly=False,
                                  extra_args=["--repl-diskless-sync-delay", "0"]).start()
        self.sim_process, port = start_simulator(rate=self.rate, seed=self.seed,
                                                 log_path=os.path.join(self.root, "logs", "exchange-sim.log"))
        self.sim = SimulatorClient(f"http://127.0.0.1:{port}", timeout=SIM_CALL_TIMEOUT_S)
        env = {"BTCFEED_PRIMARY_URL": self.primary.url, "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
               "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}", "BTCFEED_SOURCES": SOURCE,
               "BTCFEED_LOG_LEVEL": "INFO",
               "BTCFEED_BINANCE_WS_URL": f"ws://127.0.0.1:{port}",
               "BTCFEED_BINANCE_REST_URL": f"http://127.0.0.1:{port}"}
        for name in ("BTCFEED_CONFIG", "BTCFEED_LOCAL_URL"):
            env[name] = ""      # this soak's own stack, whatever the caller's environment says
        self.stack = Stack(self.root, env)
        self.stack.up(RESTART_WAIT_S)
        self.local = redis.Redis(unix_socket_path=os.path.join(self.root, "redis.sock"), socket_timeout=2,
                                 socket_connect_timeout=2)
        self.first_id = self._wait_first_trade()
        self.started = time.monotonic()
        self.say(f"stack up; the primary's first trade is {self.first_id}")

    def _wait_first_trade(self) -> int:
        client = self.primary.client()
        try:
            deadline = time.monotonic() + FIRST_TRADE_WAIT_S
            while time.monotonic() < deadline:
                first = client.xrange(keys.trades(SOURCE), count=1)
                if first:
                    return int(first[0][1][b"id"])
                time.sleep(0.1)
        finally:
            client.close()
        raise SoakAborted(f"no trade reached the primary within {FIRST_TRADE_WAIT_S:.0f}s; "
                          f"see {self.root}/logs/")

    def _keep_evidence(self) -> None:
        """Write the events stream next to the logs while the local Redis still runs."""
        if self.local is None:
            return
        try:
            events = list(reversed(recent_events(self.local, EVENTS_MAX)))
        except redis.RedisError as exc:
            self.say(f"events not saved: {_one_line(exc)}")
            return
        with open(os.path.join(self.root, "events.jsonl"), "w") as handle:
            for event in events:
                handle.write(json.dumps(event) + "\n")

    def tear_down(self, keep: bool) -> None:
        if self.local is not None:
            self.local.close()
        if self.stack is not None:
            try:
                self.stack.down()
            except (StackError, OSError) as exc:
                self.echo(f"chaos: the stack did not stop: {_one_line(exc)}")
        if self.sim_process is not None:
            stop_simulator(self.sim_process)
        for server in (self.primary, self.other):
            if server is not None:
                server.stop()
        if self.root is None:
            return
        if keep:
            root = self.root
            self.echo(f"state kept in {root}: logs {root}/logs/*.log, events {root}/events.jsonl, "
                      f"faults {root}/faults.log, primary data {root}/primary/")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    # --- faults ----------------------------------------------------------------------------------
    def inject_faults(self) -> str:
        """Faults until `minutes` have passed; returns why it stopped early ('' if it did not)."""
        deadline = self.started + self.minutes * 60
        try:
            for fault in fault_schedule(self.seed):
                if time.monotonic() + fault.gap_s >= deadline:
                    break
                self.hold(fault.gap_s)
                self.inject(fault)
            self.hold(max(0.0, deadline - time.monotonic()) + COOL_DOWN_S)
        except HARNESS_ERRORS as exc:
            reason = _one_line(exc)
            self.say(f"{self.elapsed():7.1f}s  fault injection stopped: {reason}")
            return reason
        return ""

    def inject(self, fault: Fault) -> None:
        at = self.elapsed()
        self._states = [self.writer_state()]
        try:
            getattr(self, "_" + fault.kind.replace("-", "_"))(fault)
        finally:
            self.fault_counts[fault.kind] += 1
            self.say(f"{at:7.1f}s  {fault.describe():<24} writer {' > '.join(self._states)}")

    def _primary_kill(self, fault: Fault) -> None:
        self.primary.kill()
        try:
            self.hold(fault.hold_s)
        finally:
            self.primary.start()

    def _primary_stop(self, fault: Fault) -> None:
        self.primary.freeze()
        try:
            self.hold(fault.hold_s)
        finally:
            self.primary.thaw()

    def _primary_wipe(self, fault: Fault) -> None:
        self.primary.kill()
        try:
            self.primary.wipe()
            self.hold(fault.hold_s)
        finally:
            self.primary.start()

    def _primary_replica(self, fault: Fault) -> None:
        client = self.primary.client()
        try:
            client.replicaof("127.0.0.1", self.other.port)
            try:
                self.hold(fault.hold_s)
            finally:
                client.replicaof("NO", "ONE")
        finally:
            client.close()

    def _primary_oom(self, fault: Fault) -> None:
        client = self.primary.client()
        try:
            before = client.config_get("maxmemory")["maxmemory"]
            used = int(client.info("memory")["used_memory"])
            client.config_set("maxmemory-policy", "noeviction")
            client.config_set("maxmemory", str(max(1, used // 2)))
            try:
                self.hold(fault.hold_s)
            finally:
                client.config_set("maxmemory", before)
        finally:
            client.close()

    def _primary_flush(self, fault: Fault) -> None:
        client = self.primary.client()
        try:
            client.flushall()
        finally:
            client.close()

    def _primary_empty_restart(self, fault: Fault) -> None:
        self.primary.kill()
        try:
            self.primary.wipe()
        finally:
            self.primary.start()

    def _primary_aof_tail(self, fault: Fault) -> None:
        self.primary.kill()
        try:
            self.primary.lose_aof_tail(AOF_TAIL_LOST)
        finally:
            self.primary.start()

    def _local_kill(self, fault: Fault) -> None:
        self.kill_program("redis-local")

    def _ingest_kill(self, fault: Fault) -> None:
        self.kill_program("ingest")

    def _writer_kill(self, fault: Fault) -> None:
        self.kill_program("writer")

    def _sync_kill(self, fault: Fault) -> None:
        self.kill_program("sync")

    def _ws_drop(self, fault: Fault) -> None:
        self.sim.fault("drop")

    def _ws_cut(self, fault: Fault) -> None:
        self.sim.fault("cut")

    def _ws_stall(self, fault: Fault) -> None:
        self.sim.fault("stall", seconds=fault.hold_s)
        self.hold(fault.hold_s)

    def _ws_fragment(self, fault: Fault) -> None:
        self.sim.fault("fragment", on=True)
        try:
            self.hold(fault.hold_s)
        finally:
            self.sim.fault("fragment", on=False)

    def _rest_429(self, fault: Fault) -> None:
        # A refused REST API matters only when ingest needs it: drop the connection so that the
        # reconnect's backfill meets the refusals.
        self.sim.fault("rest429", count=fault.count)
        try:
            self.sim.fault("drop")
            self.hold(fault.hold_s)
        finally:
            self.sim.fault("rest429", count=0)

    def kill_program(self, name: str) -> None:
        """SIGKILL a supervised program and wait until supervisord has it running again."""
        self.stack.wait_running([name], RESTART_WAIT_S)
        old_pid = self.stack.kill(name)
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            info = self.stack.info(name)
            if info["pid"] not in (0, old_pid) and info["statename"] == "RUNNING":
                return
            self.hold(STATE_SAMPLE_S)
        raise SoakAborted(f"{name} was not running again {RESTART_WAIT_S:.0f}s after SIGKILL; "
                          f"see {self.root}/logs/{name}.log")

    # --- observing -------------------------------------------------------------------------------
    def hold(self, seconds: float) -> None:
        """Wait, noting each change of the writer state."""
        end = time.monotonic() + seconds
        while True:
            state = self.writer_state()
            if self._states and state != self._states[-1]:
                self._states.append(state)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(STATE_SAMPLE_S, left))

    def writer_state(self) -> str:
        try:
            value = self.local.hget(keys.WRITER_STATE, "state")
        except redis.RedisError:
            return "(local down)"
        return value.decode() if value else "primary"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, line: str) -> None:
        self.echo(line)
        if self.root:
            with open(os.path.join(self.root, "faults.log"), "a") as handle:
                handle.write(line + "\n")

    # --- the end ---------------------------------------------------------------------------------
    def restore_and_settle(self) -> bool:
        """Undo anything a failed restore left behind, pause the exchange, wait for it all to land."""
        self._states = []
        self.restore_everything()
        self.sim.pause()
        self.paused_ms = int(time.time() * 1000)
        self.last_id = self.sim.status()["last_id"]
        paused_at = time.monotonic()
        self.say(f"{self.elapsed():7.1f}s  exchange paused at trade {self.last_id}; waiting for the stack "
                 f"to settle (up to {SETTLE_WAIT_S:.0f}s)")
        stable_since, why = None, ""
        while time.monotonic() - paused_at < SETTLE_WAIT_S:
            fatal = self.fatal_programs()
            if fatal:
                self.say(f"not settling: supervisord gave up on {', '.join(fatal)} (FATAL); "
                         f"see {self.root}/logs/")
                return False
            why = self.not_settled()
            now = time.monotonic()
            if why:
                stable_since = None
            elif stable_since is None:
                stable_since = now
            elif now - stable_since >= SETTLE_STABLE_S:
                self.say(f"settled {now - paused_at:.1f}s after the pause")
                return True
            time.sleep(0.2)
        self.say(f"did not settle within {SETTLE_WAIT_S:.0f}s: {why}")
        return False

    def restore_everything(self) -> None:
        if self.primary.process is None or self.primary.process.poll() is not None:
            self.primary.start()
        self.primary.thaw()
        client = self.primary.client()
        try:
            if client.info("replication").get("role") != "master":
                client.replicaof("NO", "ONE")
            client.config_set("maxmemory", "0")
        finally:
            client.close()
        self.sim.fault("fragment", on=False)
        self.sim.fault("rest429", count=0)
        try:
            self.stack.wait_running(PROGRAMS, RESTART_WAIT_S)
        except StackError as exc:
            # A program supervisord gave up on is a finding, not a reason to skip the verdict.
            self.say(f"{self.elapsed():7.1f}s  {_one_line(exc)}")

    def fatal_programs(self) -> list:
        try:
            return [p["name"] for p in self.stack.processes() if p["statename"] == "FATAL"]
        except (OSError, xmlrpc.client.Error):
            return []

    def not_settled(self) -> str:
        """'' once the writer is back on the primary with nothing left to replay or re-seed, and sync
        has verified the primary against the local copy since the exchange paused."""
        try:
            state = self.writer_state()
            backlog = self.local.xlen(keys.BACKLOG)
            sync = self.local.hmget(keys.SYNC_PRIMARY, "sweep", "verified_ms")
            reseed = sync[0] is not None or int(sync[1] or 0) < self.paused_ms
            client = self.primary.client()
            try:
                last = client.hget(keys.last(SOURCE), "id")
            finally:
                client.close()
        except redis.RedisError as exc:
            return _one_line(exc)
        last = int(last) if last is not None else None
        if state == "primary" and backlog == 0 and not reseed and last == self.last_id:
            return ""
        return (f"writer {state}, backlog {backlog} entries, re-seed or verification "
                f"{'pending' if reseed else 'done'}, "
                f"primary's last trade {last}, exchange's {self.last_id}")

    def judge(self, settled: bool) -> bool:
        span = dict(from_id=self.first_id, to_id=self.last_id)
        client = self.primary.client()
        try:
            self.verdict = verify_primary(client, self.sim, **span)
            self.derived = derived_differences(client, self.sim, self.first_id, self.last_id)
            # The local copy is what a re-seed restores the primary from: a hole in it is a loss
            # waiting for the next primary that comes back empty.
            self.local_verdict = verify_local_copy(self.local, self.sim, **span)
        except (ValueError, redis.RedisError, SimulatorError) as exc:
            self.say(f"verdict: could not compare: {_one_line(exc)}")
            return False
        finally:
            client.close()
        self.count_events()
        v, local = self.verdict, self.local_verdict
        exact = v.exact() and not self.derived and local.exact() and settled
        faults = ", ".join(f"{kind} {n}" for kind in FAULT_KINDS if (n := self.fault_counts[kind]))
        self.say(f"verdict over trades {self.first_id}..{self.last_id}:")
        self.say(f"  trades expected {v.expected} / present {v.present} / missing {len(v.missing)} / "
                 f"duplicated {len(v.duplicated)} {_also(v)}")
        self.say(f"  derived (last hash, 1-minute candles): {len(self.derived)} differences")
        self.say(f"  local copy: present {local.present} / missing {len(local.missing)} / "
                 f"duplicated {len(local.duplicated)} {_also(local)}")
        self.say(f"  faults injected: {sum(self.fault_counts.values())} ({faults or 'none'})")
        self.say("  stack events: " + ", ".join(f"{name} {self.events[name]}" for name in STACK_EVENTS))
        self._show_discrepancies("primary", v)
        for want, got in v.mismatched[:5]:
            self.say(f"  mismatched {want.id}: exchange {want} primary {got}")
        for problem in self.derived[:5]:
            self.say(f"  derived: {problem}")
        self._show_discrepancies("local copy", local)
        if exact:
            self.say("result: EXACT")
        else:
            self.say("result: NOT EXACT" + ("" if settled else " (the stack did not settle)"))
        return exact

    def _show_discrepancies(self, where: str, verdict) -> None:
        for name in ("missing", "duplicated", "unexpected"):
            ids = getattr(verdict, name)
            if ids:
                self.say(f"  {where}: first {name} {ids[:SHOW_IDS]}")

    def count_events(self) -> None:
        try:
            events = recent_events(self.local, EVENTS_MAX)
        except redis.RedisError:
            return
        self.events = collections.Counter(event["event"] for event in events)


def _also(verdict) -> str:
    return f"(unexpected {len(verdict.unexpected)}, mismatched {len(verdict.mismatched)})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
