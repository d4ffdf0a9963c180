"""Start, inspect and stop one supervised btcfeed stack (supervisord with supervisord.conf)."""

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xmlrpc.client


from supervisor.xmlrpc import SupervisorTransport


# Run from the checkout (an editable install: this file is <checkout>/common/commands/stack.py), the
# stack is the checkout's supervisord.conf, as operators use it with supervisorctl. Installed from a
# wheel, the package carries a copy of supervisord.conf and deployment/redis-local.conf (setup.py puts
# them in STACK_FILES), and `up` renders that copy into the state dir with this interpreter and the
# packaged redis-local.conf in place of the checkout's paths. config_path() is where that is decided.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(PACKAGE_DIR)
CHECKOUT_CONF = os.path.join(ROOT, "supervisord.conf")
STACK_FILES = os.path.join(PACKAGE_DIR, "commands", "stack-files")
RENDERED_CONF = "supervisord.conf"      # in the state dir, for an installed btcfeed
PROGRAMS = ("redis-local", "ingest", "writer", "sync", "health", "api", "listener")
# The checkout's paths in supervisord.conf, and what an installed stack runs instead. Any other
# %(here)s is the directory the configuration is in: the state dir, once rendered there.
CHECKOUT_PYTHON = "%(here)s/.venv/bin/python"
CHECKOUT_REDIS_CONF = "%(here)s/deployment/redis-local.conf"


def from_checkout() -> bool:
    """Whether this code is the checkout's own (not a copy installed from a wheel)."""
    return os.path.basename(PACKAGE_DIR) == "common" and os.path.isfile(CHECKOUT_CONF)


def config_path(state_dir: str) -> str:
    """The supervisord configuration of the stack in state_dir: the checkout's supervisord.conf, or, for
    an installed btcfeed, the packaged one rendered into the state dir (written again at each call, so
    an upgraded package takes effect at the next `up`)."""
    if from_checkout():
        return CHECKOUT_CONF
    return render_config(os.path.join(STACK_FILES, "supervisord.conf"),
                         os.path.join(STACK_FILES, "redis-local.conf"), state_dir)


def render_config(template: str, redis_conf: str, state_dir: str, python: str = sys.executable) -> str:
    """supervisord.conf with the checkout's interpreter and redis-local.conf replaced by `python` and
    `redis_conf`, written to state_dir/supervisord.conf (mode 0600); returns its path."""
    try:
        with open(template) as handle:
            text = handle.read()
        if not os.path.isfile(redis_conf):
            raise OSError(f"{redis_conf} is missing")
    except OSError as exc:
        raise StackError(f"the installed package lacks its supervisord configuration ({exc}); "
                         "reinstall btcfeed from a wheel built with setup.py") from None
    for checkout_path, path in ((CHECKOUT_PYTHON, python), (CHECKOUT_REDIS_CONF, redis_conf)):
        if checkout_path not in text:
            raise StackError(f"{template} does not name {checkout_path}: it does not fit this btcfeed")
        # supervisord splits a command like a shell and expands %(...)s: quote, then double each %.
        text = text.replace(checkout_path, shlex.quote(os.path.abspath(path)).replace("%", "%%"))
    left = [line for line in map(str.strip, text.splitlines()) if "%(here)s/" in line and line[:1] != ";"]
    if left:
        raise StackError(f"{template} names a file of the checkout that an installed btcfeed does not have: "
                         f"{left[0]}")
    header = (f"; Written by `btcfeed up` for the installed btcfeed ({python}), from\n"
              f";   {template}\n"
              "; and written again at each `up`: a change here does not last.\n")
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, RENDERED_CONF)
    handle = tempfile.NamedTemporaryFile("w", dir=state_dir, prefix=".supervisord-", delete=False)
    try:
        with handle:
            handle.write(header + text)
        os.chmod(handle.name, 0o600)
        os.replace(handle.name, path)
    except OSError:
        os.unlink(handle.name)
        raise
    return path


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
        conf = config_path(self.state_dir)
        # supervisord's script next to this interpreter (a venv), or its module when the scripts were
        # installed elsewhere; the processes run where the configuration is.
        supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
        command = [supervisord] if os.access(supervisord, os.X_OK) else [sys.executable, "-m",
                                                                          "supervisor.supervisord"]
        result = subprocess.run([*command, "-c", conf], env=self.env, cwd=os.path.dirname(conf),
                                capture_output=True, text=True)
        if result.returncode != 0:
            detail = " ".join((result.stderr or result.stdout).split())[:300]
            raise StackError(f"supervisord did not start: {detail}")
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
