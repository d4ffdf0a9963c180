"""bench-memory through the real stack (tools/bench/memory.py): a short outage at a real rate, the
primary back, every trade once; the figures it prints come from the parts the outage really filled."""

from tools.bench.memory import run_memory_bench


def test_an_outage_is_measured_by_part_and_ends_exact():
    lines = []
    assert run_memory_bench(rates=[300], window_s=5, echo=lines.append) == 0
    assert lines[0].startswith("exactness over every phase:") and "missing=0 duplicated=0" in lines[0]
    outage = next(k for k, line in enumerate(lines) if line.startswith("outage:"))
    on_primary = {line[:44].strip(): line[44:].split() for line in lines[1:outage]}
    assert int(on_primary["trades landed in the primary"][0].replace(",", "")) >= 300 * 4
    assert float(on_primary["mirror"][0]) > 0 and float(on_primary["read view"][0]) > 0
    rows = {line[:44].strip(): line[44:].split() for line in lines[outage:]}
    trades = int(rows["trades taken in by the backlog"][0].replace(",", ""))
    assert trades >= 300 * 4                       # the backlog took the whole window's trades in
    per_trade = {name: float(rows[name][0]) for name in ("failover copy", "backlog", "read view")}
    # The failover copy keeps one stream entry a trade (about 80 bytes); the backlog keeps its
    # batches compressed, so it must cost less a trade than the copy.
    assert 50 < per_trade["failover copy"] < 150
    assert 0 < per_trade["backlog"] < per_trade["failover copy"], per_trade
    assert "80 MB holds" in lines[-1]
