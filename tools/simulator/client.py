"""Client side of the simulator for tests, the demo and benchmarks: start and stop it as a child
process, and drive its control API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from tools.simulator.server import DEFAULT_RATE, DEFAULT_SEED

# The child runs `python -m tools.simulator`, so the checkout holding tools/ goes on its PYTHONPATH.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]     # tools/simulator/client.py -> the checkout


class SimulatorError(RuntimeError):
    """The simulator's control API refused a request or could not be reached."""


class SimulatorClient:
    """Control API client: `SimulatorClient("http://127.0.0.1:PORT").pause()`."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[len("http"):]

    def _call(self, method: str, path: str, **params):
        query = urllib.parse.urlencode({name: value for name, value in params.items() if value is not None})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SimulatorError(f"{method} {path}: HTTP {exc.code} {exc.read()[:200]!r}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise SimulatorError(f"{method} {path}: {exc}") from exc

    def status(self) -> dict:
        return self._call("GET", "/_sim/status")

    def pause(self) -> dict:
        return self._call("POST", "/_sim/pause")

    def resume(self) -> dict:
        return self._call("POST", "/_sim/resume")

    def set_rate(self, rate: float) -> dict:
        return self._call("POST", "/_sim/rate", value=rate)

    def fault(self, kind: str, **params) -> dict:
        params = {name: int(value) if isinstance(value, bool) else value for name, value in params.items()}
        return self._call("POST", "/_sim/fault", kind=kind, **params)

    def traffic(self) -> dict:
        """{"streams": {name: open connections}, "rest_calls": {path: requests so far}}."""
        return self._call("GET", "/_sim/traffic")

    def history(self, from_id: Optional[int] = None, to_id: Optional[int] = None) -> list[list]:
        """Retained trades as `[id, price, qty, time, isBuyerMaker]`, ids from_id..to_id inclusive.
        In Binance mode the ids are also the aggregate ids of the `aggTrade` records."""
        return self._call("GET", "/_sim/history", fromId=from_id, toId=to_id)


def start_simulator(rate: float = DEFAULT_RATE, seed: int = DEFAULT_SEED, *, symbol: Optional[str] = None,
                    start_id: Optional[int] = None, ping_interval: Optional[float] = None,
                    pong_timeout: Optional[float] = None, max_conn_seconds: Optional[float] = None,
                    history_max: Optional[int] = None, max_send_buffer: Optional[int] = None,
                    paused: bool = False, log_path: Optional[str] = None,
                    startup_timeout: float = 15.0,
                    mode: Optional[str] = None) -> tuple[subprocess.Popen, int]:
    """Start the simulator as a child process on a free loopback port; returns (process, port).

    Its output goes to log_path; without one it is kept only until startup succeeds (to explain a
    failed start), so nothing is left behind in the temporary directory.
    """
    options = {"--symbol": symbol, "--start-id": start_id, "--ping-interval": ping_interval,
               "--pong-timeout": pong_timeout, "--max-conn-seconds": max_conn_seconds,
               "--history-max": history_max, "--max-send-buffer": max_send_buffer, "--mode": mode}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="exchange-sim-") as workdir:
        port_file = os.path.join(workdir, "port")
        argv = [sys.executable, "-m", "tools.simulator", "--port", "0", "--port-file", port_file,
                "--rate", str(rate), "--seed", str(seed)]
        argv += [part for flag, value in options.items() if value is not None for part in (flag, str(value))]
        argv += ["--paused"] if paused else []
        log_path = os.path.abspath(log_path) if log_path else os.path.join(workdir, "sim.log")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env)
        return process, wait_for_port_file(process, port_file, log_path, startup_timeout)


def wait_for_port_file(process: subprocess.Popen, port_file: str, log_path: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(port_file):
            with open(port_file) as handle:
                return int(handle.read())
        if process.poll() is not None:
            break
        time.sleep(0.02)
    stop_simulator(process)
    with open(log_path, errors="replace") as handle:
        tail = handle.read()[-2000:]
    raise SimulatorError(f"exchange simulator did not start (exit code {process.returncode}):\n{tail}")


def stop_simulator(process: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code (0 after a clean stop)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
