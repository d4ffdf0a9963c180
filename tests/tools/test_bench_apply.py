"""bench-apply against real redis-servers (tools/bench/apply.py): each case applies every trade
once and its subscriber counts one live message per trade, so the bench's exactness line can fail;
a variant script compared with --compare-with must leave the same data as the product's."""

from btcfeed.storage.apply import SCRIPT_PATH
from tools.bench.apply import compare_scripts, make_trades, run_case, run_reference


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


def test_a_variant_that_leaves_other_data_is_caught(tmp_path):
    product = open(SCRIPT_PATH).read()
    same = tmp_path / "same.lua"
    same.write_text(product)
    assert compare_scripts(str(same), echo=lambda line: None, runs=1, trades=4000) == 0
    wrong = tmp_path / "wrong.lua"
    wrong.write_text(product.replace("'side', side,", "'side', 'buy',"))     # every taker a buyer
    assert wrong.read_text() != product
    lines = []
    assert compare_scripts(str(wrong), echo=lines.append, runs=1, trades=4000) == 1
    assert "B LEFT OTHER DATA" in lines[1]
