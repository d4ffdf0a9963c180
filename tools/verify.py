"""Count, don't eyeball: compare a primary (or any Redis with its layout) with the exchange simulator's
history id by id and field by field. Used by the tests, the demo, the benchmarks and the chaos soak."""

import collections
from dataclasses import dataclass, field

from btcfeed import keys
from btcfeed.storage.apply import expected_candles, read_candles, read_local_copy, read_trades
from btcfeed.trade import Trade, side_from_buyer_maker

SOURCE = "binance:BTCUSDT"


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


def exchange_trades(sim_client, from_id: int, to_id: int) -> list:
    rows = sim_client.history(from_id, to_id)
    return [Trade(row[0], row[1], row[2], side_from_buyer_maker(row[4]), row[3], 0) for row in rows]


def lowest_trade_id(client, source: str = SOURCE) -> int:
    """The lowest trade id in a primary's stream. Not its first entry: after a re-seed the history
    comes back behind the live trades, so stream order is not id order."""
    return min(trade.id for trade in read_trades(client, source))


def verify_primary(primary_client, sim_client, from_id: int = None, to_id: int = None,
                   source: str = SOURCE) -> Verdict:
    """Compare the primary's trade stream with the exchange's history, id by id and field by field.

    from_id defaults to the first id in the primary (a fresh stack starts at the first live trade).
    """
    return compare_with_exchange(read_trades(primary_client, source), sim_client, from_id, to_id)


def verify_local_copy(local_client, sim_client, from_id: int = None, to_id: int = None,
                      source: str = SOURCE) -> Verdict:
    """The same comparison for the local copy (mirrored batches plus the failover copy): what a
    re-seed restores the primary from. A batch mirrored twice is not an error there (the local copy
    is read as a set and re-applied idempotently), so repeats are folded first."""
    unique = {t.id: t for chunk in read_local_copy(local_client, source) for t in chunk}
    return compare_with_exchange(list(unique.values()), sim_client, from_id, to_id)


def compare_with_exchange(stored, sim_client, from_id: int = None, to_id: int = None) -> Verdict:
    """Trades read from some copy against the simulator's history for [from_id, to_id]."""
    if not stored:
        raise ValueError("no trades to compare")
    counts = collections.Counter(t.id for t in stored)
    from_id = min(counts) if from_id is None else from_id
    to_id = sim_client.status()["last_id"] if to_id is None else to_id
    expected = exchange_trades(sim_client, from_id, to_id)
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


def derived_differences(primary_client, sim_client, from_id: int, to_id: int, source: str = SOURCE) -> list:
    """How the last hash and 1-minute candles differ from a recomputation from the exchange's trades."""
    expected = exchange_trades(sim_client, from_id, to_id)
    newest = expected[-1]
    last = {k.decode(): v.decode()
            for k, v in primary_client.hgetall(keys.last(source)).items() if k != b"rts"}
    want_last = {"id": str(newest.id), "p": newest.p, "q": newest.q, "side": newest.side,
                 "ts": str(newest.ts)}
    problems = [] if last == want_last else [f"last hash {last} != {want_last}"]
    stored, wanted = read_candles(primary_client, source), expected_candles(expected)
    for minute in sorted(set(stored) | set(wanted)):
        if stored.get(minute) != wanted.get(minute):
            problems.append(f"candle {minute}: {stored.get(minute)} != {wanted.get(minute)}")
    return problems
