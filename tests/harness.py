"""Real parts for integration tests: a stand-in primary, the exchange simulator, the supervised stack,
and the id-by-id comparison of the primary against the simulator's history."""

import collections
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from common import keys
from common.apply import expected_candles, read_candles, read_trades
from common.redis_process import RedisProcess, free_port
from common.stack import Stack
from common.trade import Trade, side_from_buyer_maker
from processes.exchange_sim import SimulatorClient, start_simulator

SOURCE = "binance:BTCUSDT"


def short_tmpdir(prefix: str = "bf-") -> str:
    # Unix socket paths are limited to 108 bytes: keep state dirs short.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


class Simulator:
    def __init__(self, rate: float, seed: int = 7, **options):
        self.process, self.port = start_simulator(rate=rate, seed=seed, **options)
        self.client = SimulatorClient(f"http://127.0.0.1:{self.port}")

    @property
    def env(self) -> dict:
        return {"BTCFEED_BINANCE_WS_URL": f"ws://127.0.0.1:{self.port}",
                "BTCFEED_BINANCE_REST_URL": f"http://127.0.0.1:{self.port}"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def stack_env(primary: RedisProcess, sim: Simulator, **extra) -> dict:
    env = {"BTCFEED_PRIMARY_URL": primary.url, "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
           "BTCFEED_SOURCES": SOURCE, "BTCFEED_LOG_LEVEL": "INFO", **sim.env}
    env.update(extra)
    return env


def start_stack(primary: RedisProcess, sim: Simulator, **extra) -> Stack:
    stack = Stack(short_tmpdir("bf-stack-"), stack_env(primary, sim, **extra))
    stack.up(wait_s=30)
    return stack


def remove_stack(stack: Stack) -> None:
    stack.down()
    shutil.rmtree(stack.state_dir, ignore_errors=True)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def primary_last_id(client) -> int:
    value = client.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else -1


def drain(primary_client, sim: Simulator, timeout_s: float = 60.0) -> int:
    """Stop the exchange and wait until the primary holds its last trade; returns that id."""
    sim.client.pause()
    last_id = sim.client.status()["last_id"]
    wait_for(lambda: primary_last_id(primary_client) >= last_id, timeout_s,
             f"primary to reach trade {last_id} (it has {primary_last_id(primary_client)})")
    return last_id


@dataclass
class Verdict:
    expected: int
    present: int
    missing: list = field(default_factory=list)
    duplicated: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    def exact(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        return (f"expected={self.expected} present={self.present} missing={len(self.missing)} "
                f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)} "
                f"mismatched={len(self.mismatched)} (first missing {self.missing[:5]}, "
                f"first duplicated {self.duplicated[:5]}, first mismatched {self.mismatched[:3]})")


def exchange_trades(sim: Simulator, from_id: int, to_id: int) -> list:
    rows = sim.client.history(from_id, to_id)
    return [Trade(row[0], row[1], row[2], side_from_buyer_maker(row[4]), row[3], 0) for row in rows]


def verify_primary(primary_client, sim: Simulator, from_id: int = None, to_id: int = None) -> Verdict:
    """Compare the primary's trade stream with the exchange's history, id by id and field by field.

    from_id defaults to the first id in the primary (a fresh stack starts at the first live trade).
    """
    stored = read_trades(primary_client, SOURCE)
    assert stored, "the primary holds no trades"
    counts = collections.Counter(t.id for t in stored)
    from_id = min(counts) if from_id is None else from_id
    to_id = sim.client.status()["last_id"] if to_id is None else to_id
    expected = exchange_trades(sim, from_id, to_id)
    by_id = {t.id: t for t in stored}
    verdict = Verdict(expected=len(expected), present=len(stored))
    expected_ids = set()
    for trade in expected:
        expected_ids.add(trade.id)
        got = by_id.get(trade.id)
        if got is None:
            verdict.missing.append(trade.id)
        elif (got.p, got.q, got.side, got.ts) != (trade.p, trade.q, trade.side, trade.ts):
            verdict.mismatched.append((trade, got))
    verdict.duplicated = sorted(i for i, n in counts.items() if n > 1)
    verdict.unexpected = sorted(i for i in counts if i not in expected_ids)
    return verdict


def verify_derived(primary_client, sim: Simulator, from_id: int, to_id: int) -> None:
    """Last hash and 1-minute candles equal a recomputation from the exchange's trades."""
    expected = exchange_trades(sim, from_id, to_id)
    last = primary_client.hgetall(keys.last(SOURCE))
    newest = expected[-1]
    assert {k.decode(): v.decode() for k, v in last.items() if k != b"rts"} == {
        "id": str(newest.id), "p": newest.p, "q": newest.q, "side": newest.side, "ts": str(newest.ts)}
    assert read_candles(primary_client, SOURCE) == expected_candles(expected)
