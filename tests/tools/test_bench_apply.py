"""bench-apply against real redis-servers (tools/bench/apply.py): each case applies every trade
once and its subscriber counts one live message per trade, so the bench's exactness line can fail;
a variant script compared with --compare-with must leave the same data as the product's."""

from btcfeed.storage.apply import SCRIPT_PATH
from btcfeed import keys
from btcfeed.trade import encode_batch
from tools.bench.apply import (FLOOR_SCRIPT, SOURCE, compare_scripts, make_trades, product_applier, run_case,
                               run_reference)
from tools.redis_process import RedisProcess


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


def test_the_script_floor_writes_exactly_the_stream_entries_the_apply_script_writes(tmp_path):
    # The floor case stands for "one XADD a trade and nothing else": its entries must be the apply
    # script's, field for field, or the floor measures some other work.
    trades = make_trades(3000, now_ms=1_700_000_000_000)
    assert run_case(str(tmp_path / "floor"), trades, batch=1000, per_round_trip=2, listen=False,
                    script=FLOOR_SCRIPT)["exact"]
    streams = []
    for name, script in (("a", None), ("b", FLOOR_SCRIPT)):
        server = RedisProcess(str(tmp_path / name), appendonly=False).start()
        try:
            applier = product_applier(server.client(), script)
            assert applier.apply(SOURCE, encode_batch(trades))[0] == 3000
            streams.append([fields for _, fields in server.client().xrange(keys.trades(SOURCE))])
        finally:
            server.stop()
    assert streams[0] == streams[1] and len(streams[0]) == 3000


def test_a_comparison_in_live_size_batches_sends_one_batch_a_round_trip_and_checks_the_data(tmp_path):
    product = open(SCRIPT_PATH).read()
    same = tmp_path / "same.lua"
    same.write_text(product)
    lines = []
    assert compare_scripts(str(same), echo=lines.append, runs=1, trades=600, batch=3) == 0
    assert "3-trade batches, 1 a round trip" in lines[0]
    wrong = tmp_path / "no_compat.lua"
    wrong.write_text(product.replace("redis.call('SET', KEYS[5], best[2])", ""))   # compat price kept stale
    assert wrong.read_text() != product
    assert compare_scripts(str(wrong), echo=lambda line: None, runs=1, trades=600, batch=3) == 1
    forgetful = tmp_path / "no_seen_bits.lua"                 # every trade applied, no bit kept
    forgetful.write_text(product.replace("redis.call('SETRANGE', key, seen_bytes(segment))",
                                         "seen_bytes(segment)"))
    assert forgetful.read_text() != product
    assert compare_scripts(str(forgetful), echo=lambda line: None, runs=1, trades=600, batch=3) == 1
