"""Start, inspect and stop one supervised btcfeed stack (supervisord with supervisord.conf)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client

import redis

from supervisor.xmlrpc import SupervisorTransport

from common import config as config_module
from common.redis_process import RedisProcess, free_port
from processes.exchange_sim import SimulatorClient, start_simulator, stop_simulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "supervisord.conf")
PROGRAMS = ("redis-local", "ingest", "writer", "sync", "health", "listener")


def isolated_env(primary_url: str, sim_base_url: str, source: str = "binance:BTCUSDT", **extra) -> dict:
    """Environment for a stack fed by the exchange simulator: every setting at its built-in default
    (so the caller's BTCFEED_* cannot leak in), the simulator's URLs and a free health port."""
    env = {"BTCFEED_" + name.upper(): str(default) for name, (default, _) in config_module.SETTINGS.items()}
    env.update({
        "BTCFEED_CONFIG": "",
        "BTCFEED_LOCAL_URL": "",
        "BTCFEED_SOURCES": source,
        "BTCFEED_PRIMARY_URL": primary_url,
        "BTCFEED_BINANCE_WS_URL": "ws" + sim_base_url[len("http"):],
        "BTCFEED_BINANCE_REST_URL": sim_base_url,
        "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
    })
    env.pop("BTCFEED_STATE_DIR", None)   # Stack sets it
    env.update(extra)
    return env


class StackError(RuntimeError):
    """The stack could not be started or reached; the text says why in one line."""


class Stack:
    def __init__(self, state_dir: str, env: dict = None):
        self.state_dir = os.path.abspath(state_dir)
        self.env = {**os.environ, **(env or {}), "BTCFEED_STATE_DIR": self.state_dir}
        self.socket = os.path.join(self.state_dir, "supervisor.sock")

    # --- control ---------------------------------------------------------------------------------
    def up(self, wait_s: float = 30.0) -> None:
        if self.is_running():
            return
        for sub in ("logs", "redis"):
            os.makedirs(os.path.join(self.state_dir, sub), mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
        result = subprocess.run([supervisord, "-c", CONF], env=self.env, cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"supervisord did not start: {(result.stderr or result.stdout).strip()[:300]}")
        self.wait_running(PROGRAMS, wait_s)

    def down(self, wait_s: float = 30.0) -> None:
        pid = self.supervisord_pid()
        if pid is None:
            return
        try:
            self.rpc().supervisor.shutdown()
        except (OSError, xmlrpc.client.Fault):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            raise StackError(f"supervisord (pid {pid}) did not stop within {wait_s:.0f}s")

    def start(self, name: str) -> None:
        self.rpc().supervisor.startProcess(name, True)

    def stop(self, name: str) -> None:
        self.rpc().supervisor.stopProcess(name, True)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send a signal straight to a program's process (a real crash, not a supervised stop)."""
        pid = self.info(name)["pid"]
        if not pid:
            raise StackError(f"{name} is not running")
        os.kill(pid, sig)
        return pid

    # --- inspection ------------------------------------------------------------------------------
    def rpc(self):
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(
            None, None, "unix://" + self.socket))

    def is_running(self) -> bool:
        try:
            return self.rpc().supervisor.getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
            return False

    def supervisord_pid(self):
        try:
            with open(os.path.join(self.state_dir, "supervisord.pid")) as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def processes(self) -> list:
        return self.rpc().supervisor.getAllProcessInfo()

    def info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def wait_running(self, names, wait_s: float = 30.0) -> None:
        deadline = time.monotonic() + wait_s
        states = {}
        while time.monotonic() < deadline:
            try:
                states = {p["name"]: p["statename"] for p in self.processes()}
            except (OSError, xmlrpc.client.Fault, xmlrpc.client.ProtocolError):
                states = {}
            if states and all(states.get(n) == "RUNNING" for n in names):
                return
            if any(states.get(n) == "FATAL" for n in names):
                break
            time.sleep(0.2)
        bad = {n: states.get(n, "unknown") for n in names if states.get(n) != "RUNNING"}
        detail = ", ".join(f"{n} {s}" for n, s in bad.items())
        raise StackError(f"not running after {wait_s:.0f}s: {detail}; see {self.state_dir}/logs/")

    def log_path(self, name: str) -> str:
        return os.path.join(self.state_dir, "logs", f"{name}.log")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class SimulatedStack:
    """A stand-in primary (AOF on), the exchange simulator (started paused, so no trade predates the
    stack) and the supervised stack, in one short temporary directory; close() tears it all down.
    The benchmarks build on it."""

    def __init__(self, prefix: str):
        # Short path: the supervisor and redis unix sockets must fit in 108 bytes.
        self.root = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
        self.state_dir = os.path.join(self.root, "s")
        self.primary_server = RedisProcess(os.path.join(self.root, "primary"), appendonly=True)
        self.extra_servers = []
        self.sim_process = self.sim = self.stack = self.primary = self.local = None

    def start_primary(self, timeout_s: float = 30) -> None:
        self.primary_server.start()
        self.primary = self.primary_client(timeout_s)

    def primary_client(self, timeout_s: float) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.primary_server.port, socket_timeout=timeout_s,
                           socket_connect_timeout=timeout_s)

    def start_simulator(self, rate: float, max_send_buffer: int) -> None:
        self.sim_process, port = start_simulator(rate=rate, paused=True, max_send_buffer=max_send_buffer,
                                                 log_path=os.path.join(self.root, "simulator.log"))
        self.sim = SimulatorClient(f"http://127.0.0.1:{port}")

    def start_stack(self, connect_timeout_s: float) -> None:
        """Bring the stack up and wait until ingest is connected to the simulator."""
        self.stack = Stack(self.state_dir, isolated_env(self.primary_server.url, self.sim.base_url))
        self.stack.up()
        self.local = redis.Redis(unix_socket_path=os.path.join(self.state_dir, "redis.sock"), socket_timeout=30)
        deadline = time.monotonic() + connect_timeout_s
        while self.sim.status()["connections"] < 1:
            if time.monotonic() > deadline:
                raise StackError(f"ingest did not connect to the simulator within {connect_timeout_s:.0f}s; "
                                 f"see {self.stack.log_path('ingest')}")
            time.sleep(0.1)

    def start_extra_server(self, name: str) -> RedisProcess:
        server = RedisProcess(os.path.join(self.root, name), appendonly=True).start()
        self.extra_servers.append(server)
        return server

    def close(self, keep: bool) -> None:
        if self.stack is not None:
            try:
                self.stack.down()
            except (StackError, OSError, xmlrpc.client.Error):
                pass
        if self.sim_process is not None:
            stop_simulator(self.sim_process)
        for server in [self.primary_server, *self.extra_servers]:
            server.stop()      # SIGCONT first, so a frozen server can stop too
        for client in (self.primary, self.local):
            if client is not None:
                client.close()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
