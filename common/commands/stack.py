"""Start, inspect and stop one supervised btcfeed stack (supervisord with supervisord.conf)."""

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client


from supervisor.xmlrpc import SupervisorTransport


# The checkout (or install) root that holds supervisord.conf: common/commands/ is two levels down.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(ROOT, "supervisord.conf")
PROGRAMS = ("redis-local", "ingest", "writer", "sync", "health", "api", "listener")


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
