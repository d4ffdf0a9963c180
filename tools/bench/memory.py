"""bin/btcfeed bench-memory: what a primary outage costs the local Redis, in bytes a trade.

The real stack runs against the exchange simulator and a stand-in primary. For each rate the feed
runs on the primary for a warm-up, then the primary is SIGKILLed and the stack rides the outage on
the local Redis for a window. The growth of the local Redis over the window (used_memory, and
MEMORY USAGE of the keys the outage fills: the failover copy, the backlog, the read view) is divided
by the trades the backlog took in: the bytes a trade of outage costs. From it, how long an outage
the local Redis holds at this rate within the issue's 80 MB, and what an hour (and two) would take.
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
PARTS = {"failover copy": keys.trades(SOURCE), "backlog": keys.BACKLOG, "read view": keys.view(SOURCE)}


def run_memory_bench(rates=RATES, window_s: float = WINDOW_S, echo=print) -> int:
    rig = SimulatedStack("bf-mem-")
    keep = True
    try:
        rig.start_primary()
        rig.start_simulator(rate=max(rates), max_send_buffer=SEND_BUFFER)
        rig.start_stack(connect_timeout_s=20)
        rows = [measure_outage(rig, rate, window_s) for rate in rates]
        exact = check_exact(rig, echo)
        print_rows(rows, echo)
        keep = not exact
        return 0 if exact else 1
    except (FailoverBenchError, OSError) as exc:
        echo(f"bench-memory: could not run: {exc}")
        return 2
    finally:
        rig.close(keep=keep)


def snapshot(local) -> dict:
    """The local Redis's used memory, each part's MEMORY USAGE (every element counted) and the
    backlog's trades."""
    pipe = local.pipeline(transaction=False)
    pipe.info("memory")
    pipe.xlen(keys.BACKLOG)
    for key in PARTS.values():
        pipe.memory_usage(key, samples=0)
    memory, entries, *parts = pipe.execute()
    return {"used": int(memory["used_memory"]), "trades": backlog.held_trades(local), "entries": entries,
            **{name: usage or 0 for name, usage in zip(PARTS, parts)}}


def measure_outage(rig, rate: float, window_s: float) -> dict:
    """One rate: on the primary for the warm-up, then the primary SIGKILLed for the window; the
    growth of the local Redis over the window, once the writer is in failover."""
    rig.sim.set_rate(rate)
    rig.sim.resume()
    time.sleep(WARM_UP_S)
    rig.primary_server.kill()
    wait_until(lambda: writer_state(rig.local) != "primary", 20, "the writer to fail over")
    before = snapshot(rig.local)
    time.sleep(window_s)
    after = snapshot(rig.local)
    rig.primary_server.start()
    settle(rig)
    grown = {name: after[name] - before[name] for name in ("used", "trades", "entries", *PARTS)}
    return {"rate": rate, "trades": grown["trades"], "entries": grown["entries"], "grown": grown}


def check_exact(rig, echo) -> bool:
    rig.sim.pause()
    settle(rig)
    verdict = verify_primary(rig.primary, rig.sim)
    echo(f"exactness over every phase: {verdict}")
    return verdict.exact()


def print_rows(rows, echo) -> None:
    rates = "".join(f"{format(row['rate'], 'g') + '/s':>10}" for row in rows)
    echo(f"{'bytes of the local Redis a trade of outage':<44}{rates}")
    echo(f"{'trades taken in by the backlog':<44}" + "".join(f"{row['trades']:>10,}" for row in rows))
    echo(f"{'  in backlog entries':<44}" + "".join(f"{row['entries']:>10,}" for row in rows))
    for name in ("used", *PARTS):
        label = "used_memory (all of it)" if name == "used" else f"  {name}"
        echo(f"{label:<44}" + "".join(f"{row['grown'][name] / max(row['trades'], 1):>10.1f}" for row in rows))
    for row in rows:
        per_trade = row["grown"]["used"] / max(row["trades"], 1)
        if per_trade <= 0:
            echo(f"at {row['rate']:g}/s: the local Redis did not grow; no estimate")
            continue
        holds_s = TARGET_BYTES / (per_trade * row["rate"])
        hour_mb = per_trade * row["rate"] * 3600 / MB
        echo(f"at {row['rate']:g}/s: 80 MB holds {holds_s / 60:.0f} minutes of outage; an hour takes "
             f"{hour_mb:,.0f} MB, two hours {2 * hour_mb:,.0f} MB")
