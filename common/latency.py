"""End-to-end latency (exchange trade time -> confirmed in the primary) as a cumulative histogram.

The writer keeps one and puts it in its heartbeat; the health API turns it into a Prometheus
histogram and into p50/p99 estimates. Fixed buckets keep the heartbeat small and mergeable.
"""

import bisect

import orjson

BUCKETS_MS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class LatencyHistogram:
    def __init__(self):
        self.counts = [0] * (len(BUCKETS_MS) + 1)      # the last one is +Inf
        self.total = 0
        self.sum_ms = 0.0

    def observe(self, latency_ms: float) -> None:
        # Exchange and host clocks differ a little; a negative latency is clock skew, counted as 0.
        latency_ms = max(0.0, latency_ms)
        self.counts[bisect.bisect_left(BUCKETS_MS, latency_ms)] += 1
        self.total += 1
        self.sum_ms += latency_ms

    def snapshot(self) -> dict:
        """Cumulative counts per upper bound (as Prometheus wants them), the count and the sum."""
        cumulative, running = {}, 0
        for bound, count in zip([*map(str, BUCKETS_MS), "+Inf"], self.counts):
            running += count
            cumulative[bound] = running
        return {"buckets": cumulative, "count": self.total, "sum": round(self.sum_ms, 3)}


def quantile_ms(snapshot: dict, q: float):
    """The q-quantile estimated from cumulative buckets (linear inside a bucket), or None."""
    buckets, total = snapshot.get("buckets") or {}, snapshot.get("count") or 0
    if not total:
        return None
    rank, lower, below = q * total, 0.0, 0
    for bound, cumulative in buckets.items():
        upper = float("inf") if bound == "+Inf" else float(bound)
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            inside = cumulative - below
            return round(lower + (upper - lower) * ((rank - below) / inside if inside else 1.0), 3)
        lower, below = upper, cumulative
    return lower


def newest_trade_ts(payload: bytes) -> int:
    """The exchange time of the last (newest) trade of a bus batch, without decoding the batch.

    A batch is a JSON array of rows [id, price, qty, side, ts, receive_ts, units] in id order; the
    row fields hold no '[', so the last '[' starts the last row.
    """
    return orjson.loads(payload[payload.rindex(b"["):-1])[4]
