"""bench-apply's cases against a real redis-server (tools/bench/apply.py): each applies every trade
once and its subscriber counts one live message per trade, so the bench's exactness line can fail."""

from tools.bench.apply import make_trades, run_case, run_reference


def test_a_case_applies_every_trade_once_and_counts_its_live_messages(tmp_path):
    trades = make_trades(5000, now_ms=1_700_000_000_000)
    figures = run_case(str(tmp_path / "case"), trades, batch=500, per_round_trip=4, listen=True)
    assert figures["exact"] and figures["us"] > 0 and figures["rate"] > 0


def test_the_exactness_check_fails_when_the_stream_holds_fewer_trades_than_were_sent(tmp_path):
    trades = make_trades(1000, now_ms=1_700_000_000_000)
    # Sent twice, every trade is applied once (the seen-set skips the copies): the stream holds
    # 1,000 of the 2,000 sent, and the case must not call that exact.
    assert not run_case(str(tmp_path / "twice"), trades + trades, batch=250, per_round_trip=2,
                        listen=False)["exact"]
    assert run_reference(str(tmp_path / "reference"), 1000)["exact"]
