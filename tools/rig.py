"""The simulated rig the benchmarks and the demo build on: a stand-in primary, the exchange simulator and
the supervised stack, with every setting isolated from the caller's environment."""

import os
import shutil
import tempfile
import time
import xmlrpc.client

import redis

from btcfeed import config as config_module
from btcfeed.commands.stack import Stack, StackError
from tools.redis_process import RedisProcess, free_port
from tools.simulator import SimulatorClient, start_simulator, stop_simulator


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
        "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}",
    })
    env.pop("BTCFEED_STATE_DIR", None)   # Stack sets it
    env.update(extra)
    return env



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

    def start_stack(self, connect_timeout_s: float, **extra_env) -> None:
        """Bring the stack up (extra_env: settings other than the defaults) and wait until ingest is
        connected to the simulator."""
        env = isolated_env(self.primary_server.url, self.sim.base_url, **extra_env)
        self.stack = Stack(self.state_dir, env)
        self.stack.up()
        self.local = redis.Redis(unix_socket_path=os.path.join(self.state_dir, "redis.sock"),
                                 socket_timeout=30)
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
