"""bin/btcfeed bench-backfill: how fast btcfeed fills what it missed, against the simulator's REST
(which counts request weight as Binance does), with the live feed running beside the backfill.

  1. a long outage: ingest stopped for OUTAGE_S while the exchange prints RATE trades/s; measured
     from ingest's restart: when live trades reach the primary again, and when the gap is filled
     (the backfill rate is missing trades / that time);
  2. dropped connections: DROPS times the simulator drops the websocket; measured from the drop
     until every id up to the last one printed before it is in the primary.
Then every id of the run is checked exactly once in the primary.
"""

import statistics
import time
import xmlrpc.client

import redis

from btcfeed import keys
from tools.bench.throughput import exactness
from btcfeed.exchanges.binance import (REST_ENDPOINTS, REST_PAGE_LIMIT, WEIGHT_LIMIT_PER_MINUTE,
                                       WEIGHT_SAFE_FRACTION)
from btcfeed.commands.stack import StackError
from tools.rig import SimulatedStack
from tools.simulator import SimulatorError

SOURCE = "binance:BTCUSDT"
RATE = 2000
OUTAGE_S = 30.0
DROPS = 5
POLL_S = 0.02


def primary_last_id(rig) -> int:
    value = rig.primary.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None else 0


def gaps_left(rig) -> int:
    return rig.local.hlen(keys.gaps(SOURCE))


def wait(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(POLL_S)
    raise TimeoutError("timed out")


def long_outage(rig) -> dict:
    rig.stack.stop("ingest")
    cursor_at_stop = int(rig.local.get(keys.cursor(SOURCE)))
    time.sleep(OUTAGE_S)
    printed_before_restart = rig.sim.status()["last_id"]
    restarted = time.monotonic()
    rig.stack.start("ingest")
    live = wait(lambda: primary_last_id(rig) > printed_before_restart, 60)
    done = wait(lambda: gaps_left(rig) == 0, 600)
    missed = printed_before_restart - cursor_at_stop
    return {"live_after_s": live - restarted, "filled_after_s": done - restarted, "missing": missed,
            "rate": missed / max(done - restarted, 1e-6)}


def dropped_connection(rig) -> float:
    """From the drop until the primary holds everything again: a trade printed after the drop has
    landed (so the reconnect's gap, if any, is recorded) and no gap record is left."""
    rig.sim.fault("drop")
    dropped = time.monotonic()
    printed = rig.sim.status()["last_id"]
    return wait(lambda: primary_last_id(rig) > printed and gaps_left(rig) == 0, 120) - dropped


def run_backfill_bench(echo=print) -> int:
    rig = SimulatedStack("bf-bfbench-")
    ok = False
    try:
        rig.start_primary()
        rig.start_simulator(RATE, max_send_buffer=1 << 30)
        echo(f"bench-backfill: starting the stack; simulator at {RATE:,} trades/s")
        rig.start_stack(connect_timeout_s=20)
        rig.sim.resume()
        time.sleep(3)
        echo(f"bench-backfill: ingest stopped for {OUTAGE_S:g} s, then restarted ...")
        outage = long_outage(rig)
        drops = []
        for index in range(DROPS):
            time.sleep(2)
            echo(f"bench-backfill: dropped connection {index + 1}/{DROPS} ...")
            drops.append(dropped_connection(rig))
        rig.sim.pause()
        last_id = rig.sim.status()["last_id"]
        wait(lambda: primary_last_id(rig) >= last_id and gaps_left(rig) == 0, 120)
        exact = exactness(rig.primary, keys.trades(SOURCE), last_id)
        ok = True
    except (StackError, SimulatorError, redis.RedisError, OSError, TimeoutError, xmlrpc.client.Error) as exc:
        echo(f"bench-backfill: could not run: {type(exc).__name__}: {exc}")
        return 1
    finally:
        rig.close(keep=not ok)
    path, weight = REST_ENDPOINTS["trade"]
    ceiling = REST_PAGE_LIMIT * WEIGHT_LIMIT_PER_MINUTE * WEIGHT_SAFE_FRACTION / weight / 60
    echo("")
    echo(f"long outage ({OUTAGE_S:g} s at {RATE:,}/s): live trades in the primary "
         f"{outage['live_after_s']:.2f} s after the restart (process start included); the "
         f"{outage['missing']:,} trades printed meanwhile filled {outage['filled_after_s']:.1f} s after it "
         f"({outage['rate']:,.0f} trades/s over REST, beside the live feed)")
    echo(f"  the weight limit allows at most {ceiling:,.0f} trades/s from {path} "
         f"({REST_PAGE_LIMIT} per call, weight {weight}, {WEIGHT_SAFE_FRACTION:.0%} of "
         f"{WEIGHT_LIMIT_PER_MINUTE}/min)")
    echo(f"dropped connection -> every trade up to the drop in the primary: "
         f"median {statistics.median(drops):.2f} s, max {max(drops):.2f} s over {DROPS} drops")
    echo(f"exactness over the run: {exact.get('entries', 0):,} trades, missing {exact.get('missing')}, "
         f"duplicated {exact.get('duplicated')}")
    return 0
