"""bin/btcfeed bench-stream: GET /v1/stream delivery from the api process, and what it costs the feed.

1. Flat out: the simulator offers FAST_RATE trades/s until the view holds a backlog; one client reads
   the stream from the view's oldest trade as fast as it can (a catch-up), while the feed goes on.
   Printed: trades/s delivered to the client (target >= 50,000), and the rate landed in the primary
   in a round without the client and a round with it.
2. Many clients: the simulator offers LIVE_RATE (1,000) trades/s; 20 clients follow the live stream.
   Printed: each client's rate, the delivery delay (receive time at the client - receive time at
   ingest, p50/p99), and the landed rate in a round without and a round with them.
Every client checks that the ids it receives are consecutive.
"""

import socket
import statistics
import threading
import time
import xmlrpc.client

import orjson
import redis

from btcfeed import keys
from btcfeed.commands.stack import StackError
from tools.rig import SimulatedStack
from tools.simulator import SimulatorError

SOURCE = "binance:BTCUSDT"
FAST_RATE = 20_000
BACKLOG_S = 15.0
LIVE_RATE = 1000
CLIENTS = 20
ROUND_S = 10.0
TARGET_ONE_CLIENT = 50_000


class StreamClient(threading.Thread):
    """Reads /v1/stream over a raw socket; counts events, checks ids are consecutive, samples delays."""

    def __init__(self, port: int, after_id: int, until_id: int = None, seconds: float = None):
        super().__init__(daemon=True)
        self.port, self.after_id, self.until_id, self.seconds = port, after_id, until_id, seconds
        self.count, self.last_id, self.broken, self.delays_ms = 0, after_id, 0, []
        self.started = self.finished = None
        self.error = None

    def run(self) -> None:
        try:
            self._run()
        except OSError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.finished = time.monotonic()

    def _run(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.sendall(f"GET /v1/stream?source={SOURCE}&after_id={self.after_id} HTTP/1.0\r\n\r\n".encode())
        self.started = time.monotonic()
        buffer = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            buffer += chunk
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                continue
            block, buffer = buffer[:cut], buffer[cut + 2:]
            events = block.count(b"\nid: ") + block.startswith(b"id: ")
            if events:
                last_line = block[block.rfind(b"data: ") + 6:]
                last = orjson.loads(last_line)
                if last["id"] != self.last_id + events:
                    self.broken += 1
                self.count += events
                self.last_id = last["id"]
                self.delays_ms.append(time.time() * 1000 - last["rts"])
            if self.until_id is not None and self.last_id >= self.until_id:
                break
            if self.seconds is not None and time.monotonic() - self.started >= self.seconds:
                break
        sock.close()


def landed(rig, seconds: float) -> float:
    first, started = _last_id(rig), time.monotonic()
    time.sleep(seconds)
    return (_last_id(rig) - first) / (time.monotonic() - started)


def _last_id(rig) -> int:
    value = rig.primary.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else 0


def view_ends(port: int):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/sources", timeout=10) as response:
        source = orjson.loads(response.read())["sources"][0]
    return source["oldest_id"], source["newest_id"]


def run_stream_bench(echo=print) -> int:
    rig = SimulatedStack("bf-sbench-")
    ok = False
    try:
        rig.start_primary()
        rig.start_simulator(FAST_RATE, max_send_buffer=1 << 30)
        echo(f"bench-stream: starting the stack; simulator at {FAST_RATE:,} trades/s ...")
        rig.start_stack(connect_timeout_s=20)
        port = int(rig.stack.env["BTCFEED_API_ADDR"].rpartition(":")[2])
        rig.sim.resume()
        echo(f"bench-stream: {BACKLOG_S:g} s of trades into the view ...")
        time.sleep(BACKLOG_S)
        quiet_fast = landed(rig, ROUND_S)
        oldest, newest = view_ends(port)
        echo(f"bench-stream: one client reads trades {oldest:,}..{newest:,} flat out ...")
        one = StreamClient(port, oldest - 1, until_id=newest)
        first_id = _last_id(rig)
        one.start()
        one.join(300)
        one_rate = one.count / (one.finished - one.started)
        loaded_fast = (_last_id(rig) - first_id) / (one.finished - one.started)
        rig.sim.set_rate(LIVE_RATE)
        time.sleep(3)
        quiet_live = landed(rig, ROUND_S)
        echo(f"bench-stream: {CLIENTS} clients follow the live stream at {LIVE_RATE:,} trades/s "
             f"for {ROUND_S:g} s ...")
        _, newest = view_ends(port)
        clients = [StreamClient(port, newest, seconds=ROUND_S) for _ in range(CLIENTS)]
        for client in clients:
            client.start()
        loaded_live = landed(rig, ROUND_S)
        for client in clients:
            client.join(30)
        ok = True
    except (StackError, SimulatorError, redis.RedisError, OSError, xmlrpc.client.Error) as exc:
        echo(f"bench-stream: could not run: {type(exc).__name__}: {exc}")
        return 1
    finally:
        rig.close(keep=not ok)
    rates = [c.count / (c.finished - c.started) for c in clients]
    delays = sorted(d for c in clients for d in c.delays_ms)
    echo("")
    echo(f"One client, flat out: {one.count:,} trades in {one.finished - one.started:.2f} s "
         f"= {one_rate:,.0f} trades/s (target >= {TARGET_ONE_CLIENT:,}): "
         f"{'met' if one_rate >= TARGET_ONE_CLIENT else 'MISSED'}; "
         f"ids consecutive: {'yes' if not one.broken and not one.error else 'NO'}")
    echo(f"  feed landed in the primary at {FAST_RATE:,}/s offered: {quiet_fast:,.0f} trades/s "
         f"without the client, {loaded_fast:,.0f} with it "
         f"({100 * (loaded_fast - quiet_fast) / quiet_fast:+.1f}%)")
    echo(f"{CLIENTS} clients on the live stream at {LIVE_RATE:,} trades/s: each received "
         f"{min(rates):,.0f}..{max(rates):,.0f} trades/s (median {statistics.median(rates):,.0f}); "
         f"ids consecutive in all: {'yes' if not any(c.broken or c.error for c in clients) else 'NO'}")
    if delays:
        echo(f"  delivery delay (ingest receive -> client): p50 {delays[len(delays) // 2]:.1f} ms, "
             f"p99 {delays[int(len(delays) * 0.99)]:.1f} ms")
    echo(f"  feed landed in the primary: {quiet_live:,.0f} trades/s without the clients, "
         f"{loaded_live:,.0f} with them ({100 * (loaded_live - quiet_live) / quiet_live:+.1f}%)")
    return 0
