"""A redis-server child process on a free loopback port: the demo's stand-in primary and the tests'."""

import os
import signal
import socket
import subprocess
import time

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
