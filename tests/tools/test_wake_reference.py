"""bench-cost's machine reference (tools/bench/wake_reference.py) against a real redis-server: the
waiting process is woken once per push and its CPU is measured from the first wake on."""

from tools.bench.wake_reference import measure


def test_the_waiter_is_woken_once_per_push_and_its_cost_is_measured(tmp_path):
    result = measure(str(tmp_path / "reference"), rate=200, seconds=1.0)
    assert result["wakes"] == 199                 # every push but the first, from which CPU is counted
    assert 0 < result["us_per_wake"] < 10_000
    assert 0 < result["waiter_pct"] < 100 and result["server_pct"] >= 0
