"""A redis-server child process on a free loopback port: the demo's stand-in primary and the tests'."""

import os
import random
import signal
import socket
import subprocess
import time

import redis


# Ports for the servers the tests and benches start come from below the kernel's ephemeral range
# (32768-60999 by default), in sequence. A port from bind(port 0) is free only until it is released: the
# other test worker's next bind(port 0), or a server restarted on its old port, could take it before our
# server binds it (2,000 bind(port 0) calls here gave 154 repeats; a health server in a CI run could not
# listen on its port, and three tests on its stack failed). Each worker of a parallel test
# run counts through its own block; a process starts at a random place in its block, so a child it spawns
# (a bench run by a test) does not walk the parent's steps, and a port something still holds is skipped.
# A cluster node also listens on its port + 10000 (the cluster bus): 22000-31999, which nothing hands out.
PORT_RANGE = (12000, 22000)
_next_port = None


def _port_block():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (PORT_RANGE[1] - PORT_RANGE[0]) // max(workers, 1)
    start = PORT_RANGE[0] + (index % max(workers, 1)) * size
    return start, size


def free_port() -> int:
    global _next_port
    start, size = _port_block()
    if _next_port is None:
        _next_port = random.randrange(size)
    for _ in range(size):
        port = start + _next_port % size
        _next_port += 1
        if port_is_free(port):
            return port
    raise RuntimeError(f"no free port in {start}-{start + size - 1}")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RedisProcess:
    """One redis-server with its own directory; can be killed, frozen and restarted on the same port."""

    def __init__(self, directory: str, port: int = None, appendonly: bool = True, extra_args=(),
                 password=None):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.extra_args = list(extra_args) + (["--requirepass", password] if password else [])
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs) -> redis.Redis:
        kwargs.setdefault("password", self.password)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)

    def start(self, wait_s: float = 10.0) -> "RedisProcess":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--logfile", os.path.join(self.directory, "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited; see {self.directory}/redis.log")
            try:
                if self.client().ping():
                    return self
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {wait_s}s")

    def kill(self) -> None:
        """SIGKILL: the server dies at once, keeping only what its AOF already holds."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a black-holed primary)."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def wipe(self) -> None:
        """Remove the data files so the next start comes back empty."""
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.startswith(("appendonly", "dump")):
                if os.path.isdir(path):
                    for inner in os.listdir(path):
                        os.unlink(os.path.join(path, inner))
                    os.rmdir(path)
                else:
                    os.unlink(path)

    def lose_aof_tail(self, fraction: float) -> int:
        """What a host crash does to a server whose AOF was not yet fsynced: cut the newest part of the
        AOF (the last incremental file, the tail of the multi-part AOF). Call between kill() and start();
        the server loads up to the last whole command (aof-load-truncated). Returns the bytes cut."""
        directory = os.path.join(self.directory, "appendonlydir")
        tails = sorted((name for name in os.listdir(directory) if name.endswith(".incr.aof")),
                       key=lambda name: int(name.split(".")[-3]))
        path = os.path.join(directory, tails[-1])
        size = os.path.getsize(path)
        cut = int(size * fraction)
        with open(path, "r+b") as handle:
            handle.truncate(size - cut)
        return cut
