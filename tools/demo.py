"""bin/btcfeed demo: the real stack against the bundled exchange simulator and a stand-in primary,
offline, with a failover drill: the primary goes away, trades land locally, it comes back, the backlog
is replayed and handed back, and the final count shows every trade exactly once."""

import os
import shutil
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from btcfeed import config as config_module
from tools import verify
from btcfeed import keys
from btcfeed.events import recent_events
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands.stack import Stack, StackError
from tools.verify import SOURCE, derived_differences, verify_primary
from tools.simulator import SimulatorClient, start_simulator

DRILL_EVENTS = ("failover", "primary_changed", "primary_unhealthy", "drain_start", "hand_back", "reseed_done",
                "drain_failed")


class Demo:
    def __init__(self, state_root: str, rate: int, echo):
        self.root = os.path.join(state_root, "demo")
        self.rate = rate
        self.echo = echo
        self.sim_process = self.primary = self.stack = None

    # --- set-up and tear-down --------------------------------------------------------------------
    def start(self) -> None:
        old = Stack(os.path.join(self.root, "stack"))
        if old.supervisord_pid() is not None:
            old.down()
        shutil.rmtree(self.root, ignore_errors=True)
        os.makedirs(self.root, mode=0o700)
        self.primary = RedisProcess(os.path.join(self.root, "primary")).start()
        self.sim_process, port = start_simulator(rate=self.rate, seed=42,
                                                 log_path=os.path.join(self.root, "simulator.log"))
        self.sim = SimulatorClient(f"http://127.0.0.1:{port}")
        env = {"BTCFEED_PRIMARY_URL": self.primary.url, "BTCFEED_SOURCES": SOURCE,
               "BTCFEED_BINANCE_WS_URL": f"ws://127.0.0.1:{port}",
               "BTCFEED_BINANCE_REST_URL": f"http://127.0.0.1:{port}",
               "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
               "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}",
               "BTCFEED_LOCAL_URL": "",
               "BTCFEED_CONFIG": ""}
        self.stack = Stack(os.path.join(self.root, "stack"), env)
        self.echo(f"demo: exchange simulator on 127.0.0.1:{port} ({self.rate} trades/s), "
                  f"stand-in primary on {self.primary.url}, stack in {self.stack.state_dir}")
        self.stack.up()
        self.local = redis.Redis(unix_socket_path=os.path.join(self.stack.state_dir, "redis.sock"),
                                 socket_timeout=5)

    def stop(self) -> None:
        if self.stack is not None:
            try:
                self.stack.down()
            except StackError as exc:
                self.echo(f"demo: {exc}")
        if self.sim_process is not None:
            self.sim_process.terminate()
            self.sim_process.wait(10)
        if self.primary is not None:
            self.primary.stop()

    # --- what the demo shows ---------------------------------------------------------------------
    def primary_view(self):
        """(trades in the primary, last price there), or (None, None) while it is down; a quick
        look with no retries, so a dead primary does not slow the display down."""
        client = redis.Redis(host="127.0.0.1", port=self.primary.port, socket_timeout=0.3,
                             socket_connect_timeout=0.3, retry=Retry(NoBackoff(), 0))
        try:
            pipe = client.pipeline(transaction=False)
            pipe.xlen(keys.trades(SOURCE))
            pipe.hget(keys.last(SOURCE), "p")
            return tuple(pipe.execute())
        except redis.RedisError:
            return None, None
        finally:
            client.close()

    def show(self, phase: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(1)
            self.echo(self.status_line(phase))

    def status_line(self, phase: str) -> str:
        state = (self.local.hget(keys.WRITER_STATE, "state") or b"primary").decode()
        in_primary, last = self.primary_view()
        if in_primary is None:        # the failover copy has the newest price meanwhile
            last = self.local.hget(keys.last(SOURCE), "p")
        return (f"  [{phase:<8}] writer={state:<8} price={(last or b'-').decode():<15} "
                f"primary={'DOWN' if in_primary is None else in_primary:>7} "
                f"local failover copy={self.local.xlen(keys.trades(SOURCE)):>6} "
                f"backlog entries={self.local.xlen(keys.BACKLOG):>4}")

    def writer_state(self) -> str:
        return (self.local.hget(keys.WRITER_STATE, "state") or b"primary").decode()

    def run(self, seconds: float) -> int:
        self.echo("1) live feed: exchange -> ingest -> bus -> writer -> primary")
        self.show("live", max(3.0, seconds / 3))
        self.echo("2) the primary dies (SIGKILL): trades keep landing in the local copy and the backlog")
        self.primary.kill()
        self.show("primary down", max(4.0, seconds / 3))
        self.echo("3) the primary is back (with its data): sync probes it, replays the backlog, hands back")
        self.primary.start()
        deadline = time.monotonic() + 60
        while self.writer_state() != "primary" and time.monotonic() < deadline:
            time.sleep(0.5)
            self.echo(self.status_line("replay"))
        self.show("live", max(3.0, seconds / 3))
        return self.final_count()

    def final_count(self) -> int:
        self.echo("4) the count: the exchange stops; every trade it printed must be in the primary "
                  "exactly once")
        self.sim.pause()
        last_id = self.sim.status()["last_id"]
        client = self.primary.client()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            have = client.hget(keys.last(SOURCE), "id")
            if have is not None and int(have) >= last_id and self.writer_state() == "primary":
                break
            time.sleep(0.2)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, self.sim, from_id=first, to_id=last_id)
        problems = derived_differences(client, self.sim, first, last_id)
        self.echo("   events:")
        for event in reversed(recent_events(self.local, 50)):
            if event["event"] in DRILL_EVENTS:
                when = time.strftime("%H:%M:%S", time.localtime(event["ts"] / 1000))
                details = " ".join(f"{k}={v}" for k, v in event["fields"].items())
                self.echo(f"     {when} {event['event']:<17} {details[:110]}")
        self.echo(f"   trades generated {verdict.expected} (ids {first}..{last_id}), in the primary "
                  f"{verdict.present}, missing {len(verdict.missing)}, duplicated {len(verdict.duplicated)}, "
                  f"wrong {len(verdict.mismatched)}; last price and candles: "
                  f"{'correct' if not problems else '; '.join(problems[:3])}")
        exact = verdict.exact() and not problems
        self.echo("   EXACT: every trade once" if exact else "   NOT EXACT: see the figures above")
        return 0 if exact else 1


def run_demo(seconds: float, rate: int, echo) -> int:
    try:
        state_root = config_module.load().state_dir
    except config_module.ConfigError as exc:
        echo(f"demo: configuration error: {exc}")
        return 2
    demo = Demo(state_root, rate, echo)
    try:
        demo.start()
        return demo.run(seconds)
    except (StackError, RuntimeError, redis.RedisError, OSError) as exc:
        echo(f"demo: could not run: {exc}")
        return 1
    except KeyboardInterrupt:
        echo("demo: interrupted")
        return 130
    finally:
        demo.stop()
