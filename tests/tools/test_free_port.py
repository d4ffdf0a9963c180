"""The ports the tests hand their servers: never one another worker, a restart or the kernel could take."""

import os
import socket
import subprocess
import sys

from tools import redis_process
from tools.redis_process import PORT_RANGE, free_port, port_is_free

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ports_of_worker(index: int, count: int, how_many: int) -> list:
    """Ports a fresh process that is worker `index` of `count` hands out, asked in a child process."""
    env = {**os.environ, "PYTEST_XDIST_WORKER": f"gw{index}", "PYTEST_XDIST_WORKER_COUNT": str(count)}
    code = ("from tools.redis_process import free_port\n"
            f"print(' '.join(str(free_port()) for _ in range({how_many})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [int(port) for port in out.split()]


def test_a_port_is_not_handed_out_twice_while_released_ports_pile_up():
    # bind(port 0) hands a released port out again soon; these are released at once, as a stopped
    # server's are, and must still not come back.
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)


def test_ports_lie_below_the_ephemeral_range_and_leave_the_cluster_bus_ports_clear():
    low, high = (int(n) for n in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for port in (free_port() for _ in range(200)):
        assert PORT_RANGE[0] <= port < PORT_RANGE[1]
        assert port + 10000 < low                          # the cluster bus port is not the kernel's
        assert not PORT_RANGE[0] <= port + 10000 < PORT_RANGE[1]


def test_two_workers_of_one_run_never_share_a_port():
    first, second = ports_of_worker(0, 2, 500), ports_of_worker(1, 2, 500)
    assert len(set(first)) == 500 and len(set(second)) == 500
    assert not set(first) & set(second)


def test_a_port_something_listens_on_is_skipped():
    free_port()                                            # the sequence has begun
    upcoming = redis_process._next_port
    start, size = redis_process._port_block()
    taken = start + upcoming % size
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        assert not port_is_free(taken)
        assert free_port() == start + (upcoming + 1) % size
