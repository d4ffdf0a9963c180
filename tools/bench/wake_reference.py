"""The cost floor of this machine for a process that waits on Redis: a Python process blocked in
BLPOP on a redis-server's unix socket, woken `rate` times a second by a push, on the same kind of
dedicated connection the writer and ingest use for their per-round commands. Every btcfeed process on
the write path pays at least this per wake-up, so bench-cost prints the stack's CPU as a multiple of
it. The ratio is a guide, not a constant: on the 2-core test machine the same commit gave 5.3-5.8x in
its fast periods and 8.9-9.0x in its slow ones, so A/B figures still come from alternated runs.

Run as a module it is the waiting side; measure() starts it and pushes.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import redis

from btcfeed.storage.dedicated import DedicatedConnection
from tools.redis_process import RedisProcess

QUEUE = "wake-reference"
END = b"end"


def measure(directory: str, rate: float, seconds: float) -> dict:
    """Percent of one core used by the waiting process and by the server, and CPU µs per wake."""
    socket_path = os.path.join(directory, "redis.sock")
    server = RedisProcess(directory, appendonly=False, extra_args=["--unixsocket", socket_path]).start()
    try:
        return _push_and_measure(server, f"unix://{socket_path}", rate, seconds)
    finally:
        server.stop()


def _push_and_measure(server, url: str, rate: float, seconds: float) -> dict:
    pusher = redis.Redis.from_url(url)
    waiter = subprocess.Popen([sys.executable, "-m", "tools.bench.wake_reference", url],
                              stdout=subprocess.PIPE, text=True)
    server_cpu = psutil.Process(server.process.pid)
    time.sleep(1.0)                                    # the waiter has started and blocks
    before = server_cpu.cpu_times()
    started = time.monotonic()
    for number in range(int(rate * seconds)):
        pusher.rpush(QUEUE, number)
        delay = started + (number + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    elapsed = time.monotonic() - started
    after = server_cpu.cpu_times()
    pusher.rpush(QUEUE, END)
    result = json.loads(waiter.communicate(timeout=30)[0])
    server_s = (after.user + after.system) - (before.user + before.system)
    return {"waiter_pct": 100 * result["cpu_s"] / elapsed,
            "us_per_wake": 1e6 * result["cpu_s"] / result["wakes"],
            "server_pct": 100 * server_s / elapsed, "wakes": result["wakes"]}


def wait_for_pushes(url: str) -> dict:
    connection = DedicatedConnection(redis.Redis.from_url(url))
    wakes, cpu_started = 0, None
    while True:
        reply = connection.call("BLPOP", QUEUE, 30)
        if reply is None or reply[1] == END:
            break
        if cpu_started is None:
            cpu_started = time.process_time()        # from the first wake: not the start-up
        else:
            wakes += 1
    return {"wakes": wakes, "cpu_s": time.process_time() - (cpu_started or time.process_time())}


if __name__ == "__main__":
    print(json.dumps(wait_for_pushes(sys.argv[1])))
