"""bin/btcfeed bench-reseed: a primary that comes back empty while the local copy holds millions of trades.

The real stack runs against the exchange simulator (live trades at --rate). The local copy is given
--trades older trades (mirrored batches, as the writer leaves them, and applied to the primary), then
the primary is SIGKILLed, its files removed, and started again empty. Printed:
  - the time from the primary's return to the first live trade in it (target: under 1 s),
  - the re-seed's duration and rate (sync's reseed_done event), and when the primary held it all,
  - exactness: every re-seeded id once, and the live trades exact against the simulator.
"""

import collections
import time

import psutil

from btcfeed import keys
from btcfeed.commands.stack import StackError
from btcfeed.events import recent_events
from btcfeed.storage import epochs
from btcfeed.storage.apply import BatchApplier, compressed_batch, read_trades_since
from btcfeed.storage.bus import read_heartbeats
from btcfeed.trade import Trade, encode_batch
from tools.bench.failover import FailoverBenchError, wait_until
from tools.rig import SimulatedStack
from tools.verify import SOURCE, compare_with_exchange

BATCH = 2_000                     # trades per mirrored batch, as the writer's largest
APPLY_BATCHES_PER_CALL = 16
LIVE_START_ID = 50_000_000        # the simulator's first id; the old trades sit below it
STEP_MS = 5                       # exchange time between two old trades
TIMEOUT_S = 600.0
COST_S = 60.0                     # how long the anti-entropy's own cost is measured


def old_batches(count: int):
    """Encoded batches of `count` trades just below the live ids, inside the retention window."""
    first_id = LIVE_START_ID - count
    start_ts = int(time.time() * 1000) - count * STEP_MS
    for offset in range(0, count, BATCH):
        size = min(BATCH, count - offset)
        yield encode_batch([Trade(first_id + offset + i, "43210.%02d" % ((offset + i) % 100), "0.00100000",
                                  "buy" if i % 2 else "sell", start_ts + (offset + i) * STEP_MS,
                                  start_ts + (offset + i) * STEP_MS + 3) for i in range(size)])


def fill_local_copy(rig: SimulatedStack, count: int, echo) -> None:
    """What hours of a healthy feed leave behind: the batches in the primary and in the local mirror."""
    applier = BatchApplier(rig.primary, 24 * 3600 * 1000, epochs=epochs.known_epochs(rig.local))
    started, pending = time.monotonic(), []
    for payload in old_batches(count):
        pending.append(payload)
        if len(pending) == APPLY_BATCHES_PER_CALL:
            _apply_and_mirror(rig, applier, pending)
            pending = []
    if pending:
        _apply_and_mirror(rig, applier, pending)
    echo(f"  local copy and primary given {count:,} older trades in {time.monotonic() - started:.1f} s")


def _apply_and_mirror(rig, applier, payloads) -> None:
    applier.apply_many([(SOURCE, payload) for payload in payloads])
    pipe = rig.local.pipeline(transaction=False)
    for payload in payloads:
        pipe.xadd(keys.mirror(SOURCE), compressed_batch(payload))
    entry_ids = pipe.execute()
    rig.local.hset(keys.MIRROR_CONFIRMED, SOURCE, entry_ids[-1])


def run_reseed_bench(trades: int = 5_000_000, rate: float = 1000, echo=print) -> int:
    rig = SimulatedStack("bf-rs-")
    keep = True
    try:
        echo(f"bench-reseed: {trades:,} trades in the local copy, live feed at {rate:g} trades/s")
        rig.start_primary()
        rig.sim_process, port = _simulator(rig, rate)
        rig.start_stack(connect_timeout_s=20)
        rig.sim.resume()
        wait_until(lambda: rig.primary.hget(keys.last(SOURCE), "id"), 30, "the first live trade", 0.05)
        measure_anti_entropy_cost(rig, rate, echo)
        fill_local_copy(rig, trades, echo)
        verified_from = int(time.time() * 1000)
        wait_until(lambda: int(rig.local.hget(keys.SYNC_PRIMARY, "verified_ms") or 0) > verified_from, 120,
                   "sync to take the local copy in", 0.1)
        keep = measure(rig, trades, echo)
        return 0 if not keep else 1
    except (FailoverBenchError, StackError, OSError) as exc:
        echo(f"bench-reseed: could not run: {exc}")
        return 2
    finally:
        rig.close(keep=keep)


def measure_anti_entropy_cost(rig, rate: float, echo) -> None:
    """sync's CPU and the seen-set bytes it compares per minute, with the live feed at `rate`."""
    sync = psutil.Process(rig.stack.info("sync")["pid"])
    before_bytes = _compared_bytes(rig)
    before_cpu, started = sum(sync.cpu_times()[:2]), time.monotonic()
    time.sleep(COST_S)
    cpu = sum(sync.cpu_times()[:2]) - before_cpu
    elapsed = time.monotonic() - started
    compared = _compared_bytes(rig) - before_bytes
    echo(f"  anti-entropy at {rate:g} trades/s: sync {100 * cpu / elapsed:.2f}% of a core, "
         f"{compared * 60 / elapsed / 1024:,.0f} KiB of seen-sets compared per minute")


def _compared_bytes(rig) -> int:
    beat = read_heartbeats(rig.local, ["sync"])["sync"] or {}
    return int(beat.get("compared_bytes") or 0)


def _simulator(rig, rate):
    from tools.simulator import SimulatorClient, start_simulator
    process, port = start_simulator(rate=rate, paused=True, start_id=LIVE_START_ID,
                                    log_path=f"{rig.root}/simulator.log")
    rig.sim = SimulatorClient(f"http://127.0.0.1:{port}")
    return process, port


def measure(rig, trades: int, echo) -> bool:
    """Kill, wipe, restart the primary; time the first live trade and the re-seed. True if not exact."""
    before = int(rig.primary.hget(keys.last(SOURCE), "id"))
    rig.primary_server.kill()
    rig.primary_server.wipe()
    rig.primary_server.start()
    back = time.monotonic()
    back_ms = int(time.time() * 1000)
    client = rig.primary_client(30)
    first_live = wait_until(lambda: _live_in(client, before), TIMEOUT_S,
                            "a live trade in the returned primary", interval_s=0.005)
    live_after = time.monotonic() - back
    wait_until(lambda: [e for e in recent_events(rig.local, 50)
                        if e["event"] == "reseed_done" and e["ts"] >= back_ms], TIMEOUT_S, "the re-seed", 0.1)
    done = [e for e in recent_events(rig.local, 50) if e["event"] == "reseed_done" and e["ts"] >= back_ms][0]
    all_back = time.monotonic() - back
    rig.sim.pause()
    last_id = rig.sim.status()["last_id"]
    wait_until(lambda: int(client.hget(keys.last(SOURCE), "id") or 0) >= last_id, 60, "the last live trade")
    fields = done["fields"]
    added, seconds = fields.get("trades_added", 0), max(fields.get("seconds", 0), 1e-3)
    echo(f"  first live trade ({first_live}) in the returned primary {live_after * 1000:.0f} ms after it "
         "came back (target under 1,000 ms)")
    echo(f"  re-seed: {added:,} trades in {seconds:.1f} s ({added / seconds:,.0f} trades/s), done "
         f"{all_back:.1f} s after the return; the live feed went on meanwhile")
    stored = [trade for chunk in read_trades_since(client, SOURCE, 50_000) for trade in chunk]
    old_ids = collections.Counter(trade.id for trade in stored if trade.id < LIVE_START_ID)
    old_exact = (len(old_ids) == trades and set(old_ids.values()) == {1}
                 and min(old_ids) == LIVE_START_ID - trades)
    live_trades = [t for t in stored if t.id >= LIVE_START_ID]
    live = compare_with_exchange(live_trades, rig.sim, LIVE_START_ID, last_id)
    exact = live.exact() and old_exact
    echo(f"  exact: old trades {len(old_ids):,} distinct of {trades:,} (each once: {old_exact}); live {live}")
    echo("result: " + ("EXACT" if exact else "NOT EXACT (state kept in " + rig.root + ")"))
    return not exact


def _live_in(client, before: int):
    value = client.hget(keys.last(SOURCE), "id")
    return int(value) if value is not None and int(value) > before else None
