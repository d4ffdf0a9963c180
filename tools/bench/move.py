"""bin/btcfeed bench-move: `btcfeed primary move` of a full window to a new primary, with the live feed on.

The real stack runs against the exchange simulator (live trades at --rate). The local copy and the old
primary are given --trades older trades (as the re-seed bench does: a 24 h window at a real rate), then
`btcfeed primary move --to` a new, empty primary runs. Printed: the move's duration and copy rate, how
long the writer was on the local copy, and exactness in the new primary (every old id once, the live
trades against the simulator) and in the old one (nothing written after the switch).
"""

import collections
import os
import subprocess
import sys
import time

from btcfeed import keys
from btcfeed.commands.stack import StackError
from btcfeed.events import recent_events
from btcfeed.storage.apply import read_trades_since
from tools.bench.failover import FailoverBenchError, wait_until
from tools.bench.reseed import LIVE_START_ID, _simulator, fill_local_copy
from tools.rig import SimulatedStack
from tools.verify import SOURCE, compare_with_exchange

MOVE_TIMEOUT_S = 1800.0


def run_move_bench(trades: int = 2_000_000, rate: float = 1000, echo=print) -> int:
    rig = SimulatedStack("bf-mv-")
    keep = True
    try:
        echo(f"bench-move: {trades:,} trades in the window, live feed at {rate:g} trades/s")
        rig.start_primary()
        rig.sim_process, _ = _simulator(rig, rate)
        rig.start_stack(connect_timeout_s=20)
        rig.sim.resume()
        wait_until(lambda: rig.primary.hget(keys.last(SOURCE), "id"), 30, "the first live trade", 0.05)
        fill_local_copy(rig, trades, echo)
        verified_from = int(time.time() * 1000)
        wait_until(lambda: int(rig.local.hget(keys.SYNC_PRIMARY, "verified_ms") or 0) > verified_from, 300,
                   "sync to take the local copy in", 0.1)
        target = rig.start_extra_server("new-primary")
        keep = measure(rig, target, trades, echo)
        return 0 if not keep else 1
    except (FailoverBenchError, StackError, OSError) as exc:
        echo(f"bench-move: could not run: {exc}")
        return 2
    finally:
        rig.close(keep=keep)


def measure(rig, target, trades: int, echo) -> bool:
    """Run the move, then check both primaries; True when something is not exact."""
    command = [sys.executable, "-m", "btcfeed.commands.cli", "primary", "move", "--to", target.url]
    started = time.monotonic()
    done = subprocess.run(command, env={**os.environ, **rig.stack.env}, capture_output=True, text=True,
                          timeout=MOVE_TIMEOUT_S)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        echo(f"  the move failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return True
    moved = [e for e in recent_events(rig.local, 200) if e["event"] == "primary_moved"][0]["fields"]
    copied = moved["trades_copied"]
    echo(f"  move: {seconds:.1f} s for {copied:,} trades ({copied / max(seconds, 1e-3):,.0f} trades/s), "
         f"the writer on the local copy for {moved['paused_s']} s; the live feed went on throughout")
    old = rig.primary
    frozen = (old.xlen(keys.trades(SOURCE)), old.hget(keys.last(SOURCE), "id"))
    new = target.client()
    time.sleep(2)
    rig.sim.pause()
    last_id = rig.sim.status()["last_id"]
    wait_until(lambda: int(new.hget(keys.last(SOURCE), "id") or 0) >= last_id, 60, "the last live trade")
    stored = [trade for chunk in read_trades_since(new, SOURCE, 50_000) for trade in chunk]
    old_ids = collections.Counter(trade.id for trade in stored if trade.id < LIVE_START_ID)
    old_exact = len(old_ids) == trades and set(old_ids.values()) == {1}
    live = compare_with_exchange([t for t in stored if t.id >= LIVE_START_ID], rig.sim, LIVE_START_ID,
                                 last_id)
    untouched = (old.xlen(keys.trades(SOURCE)), old.hget(keys.last(SOURCE), "id")) == frozen
    exact = old_exact and live.exact() and untouched
    echo(f"  exact: window {len(old_ids):,} distinct of {trades:,} (each once: {old_exact}); live {live}; "
         f"old primary untouched after the switch: {untouched}")
    echo("result: " + ("EXACT" if exact else "NOT EXACT (state kept in " + rig.root + ")"))
    return not exact
