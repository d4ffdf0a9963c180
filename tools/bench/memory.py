"""bin/btcfeed bench-memory: what the local Redis holds a trade, on the primary and through an outage.

The real stack runs against the exchange simulator and a stand-in primary. For each rate, after a
warm-up, two windows of the same length:
  on the primary  the growth of the local Redis (used_memory, and MEMORY USAGE of the mirror and the
                  read view, which keep the retention window) divided by the trades that landed in
                  the primary: what a day of retention takes at that rate;
  outage          the primary SIGKILLed; the growth (used_memory, the failover copy, the backlog, the
                  read view) divided by the trades the backlog took in: how long an outage the issue's
                  80 MB holds at that rate, and what an hour (and two) would take.
The primary then comes back with its data, sync replays, and the run ends exact (0 missing, 0
duplicated) or says so.
"""

import time

from btcfeed import keys
from btcfeed.storage import backlog
from tools.bench.failover import FailoverBenchError, settle, wait_until, writer_state
from tools.rig import SimulatedStack
from tools.verify import SOURCE, verify_primary

RATES = (300, 1000)
WARM_UP_S = 5.0
WINDOW_S = 30.0
SEND_BUFFER = 1 << 20
TARGET_BYTES = 80 * 1024 * 1024     # the default bound for the local Redis
MB = 1024 * 1024
PARTS = {"failover copy": keys.trades(SOURCE), "backlog": keys.BACKLOG, "read view": keys.view(SOURCE),
         "mirror": keys.mirror(SOURCE)}
ON_PRIMARY_PARTS = ("used", "mirror", "read view")
OUTAGE_PARTS = ("used", "failover copy", "backlog", "read view")


def run_memory_bench(rates=RATES, window_s: float = WINDOW_S, echo=print) -> int:
    rig = SimulatedStack("bf-mem-")
    keep = True
    try:
        rig.start_primary()
        rig.start_simulator(rate=max(rates), max_send_buffer=SEND_BUFFER)
        rig.start_stack(connect_timeout_s=20)
        rows = [measure_rate(rig, rate, window_s) for rate in rates]
        exact = check_exact(rig, echo)
        print_on_primary(rows, echo)
        print_outage(rows, echo)
        keep = not exact
        return 0 if exact else 1
    except (FailoverBenchError, OSError) as exc:
        echo(f"bench-memory: could not run: {exc}")
        return 2
    finally:
        rig.close(keep=keep)


def snapshot(local) -> dict:
    """The local Redis's used memory, each part's MEMORY USAGE (every element counted), the backlog's
    trades and entries."""
    pipe = local.pipeline(transaction=False)
    pipe.info("memory")
    pipe.xlen(keys.BACKLOG)
    for key in PARTS.values():
        pipe.memory_usage(key, samples=0)
    memory, entries, *parts = pipe.execute()
    return {"used": int(memory["used_memory"]), "trades": backlog.held_trades(local), "entries": entries,
            **{name: usage or 0 for name, usage in zip(PARTS, parts)}}


def growth(local, window_s: float, landed) -> dict:
    """What the local Redis grew by over the window, and the trades landed(): before and after."""
    before, landed_before = snapshot(local), landed()
    time.sleep(window_s)
    after, landed_after = snapshot(local), landed()
    return {"landed": landed_after - landed_before, **{name: after[name] - before[name] for name in before}}


def measure_rate(rig, rate: float, window_s: float) -> dict:
    """One rate: the warm-up, a window on the primary, then a window with the primary SIGKILLed (from
    the moment the writer is in failover), then the primary back and every trade in it."""
    rig.sim.set_rate(rate)
    rig.sim.resume()
    time.sleep(WARM_UP_S)
    on_primary = growth(rig.local, window_s, lambda: _landed(rig.primary))
    rig.primary_server.kill()
    wait_until(lambda: writer_state(rig.local) != "primary", 20, "the writer to fail over")
    outage = growth(rig.local, window_s, lambda: backlog.held_trades(rig.local))
    rig.primary_server.start()
    settle(rig)
    return {"rate": rate, "on_primary": on_primary, "outage": outage}


def _landed(primary) -> int:
    return int(primary.xinfo_stream(keys.trades(SOURCE))["entries-added"])


def check_exact(rig, echo) -> bool:
    rig.sim.pause()
    settle(rig)
    verdict = verify_primary(rig.primary, rig.sim)
    echo(f"exactness over every phase: {verdict}")
    return verdict.exact()


def _table(rows, phase: str, title: str, landed_label: str, parts, echo) -> None:
    rates = "".join(f"{format(row['rate'], 'g') + '/s':>10}" for row in rows)
    echo(f"{title:<44}{rates}")
    echo(f"{landed_label:<44}" + "".join(f"{row[phase]['landed']:>10,}" for row in rows))
    for name in parts:
        label = "used_memory (all of it)" if name == "used" else f"  {name}"
        echo(f"{label:<44}" + "".join(f"{_per_trade(row[phase], name):>10.1f}" for row in rows))


def _per_trade(figures: dict, name: str = "used") -> float:
    return figures[name] / max(figures["landed"], 1)


def print_on_primary(rows, echo) -> None:
    _table(rows, "on_primary", "on the primary: local bytes a trade", "trades landed in the primary",
           ON_PRIMARY_PARTS, echo)
    for row in rows:
        day_mb = _per_trade(row["on_primary"]) * row["rate"] * 86400 / MB
        echo(f"at {row['rate']:g}/s: a day of retention takes {day_mb:,.0f} MB")


def print_outage(rows, echo) -> None:
    _table(rows, "outage", "outage: local bytes a trade", "trades taken in by the backlog", OUTAGE_PARTS,
           echo)
    echo(f"{'  in backlog entries':<44}" + "".join(f"{row['outage']['entries']:>10,}" for row in rows))
    for row in rows:
        per_trade = _per_trade(row["outage"])
        if per_trade <= 0:
            echo(f"at {row['rate']:g}/s: the local Redis did not grow; no estimate")
            continue
        holds_s = TARGET_BYTES / (per_trade * row["rate"])
        hour_mb = per_trade * row["rate"] * 3600 / MB
        echo(f"at {row['rate']:g}/s: 80 MB holds {holds_s / 60:.0f} minutes of outage; an hour takes "
             f"{hour_mb:,.0f} MB, two hours {2 * hour_mb:,.0f} MB")
