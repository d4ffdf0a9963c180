"""The price view's choice of source: the most preferred live one, back to a preferred one when it is live
again, never a switch because the whole market is quiet, and a price that only moves forward."""

import pytest

from btcfeed import price
from btcfeed.trade import Trade, encode_batch

ORDER = ["binance:BTCUSDT", "coinbase:BTC-USD", "kraken:BTC/USD"]
STALE = 1000


def row(trade_id: int, rts: int, p: str = "100.5") -> list:
    return [trade_id, p, "0.1", "buy", rts - 3, rts, 10_000_000]


def selector() -> price.PriceSelector:
    return price.PriceSelector(ORDER, STALE)


def test_the_first_trade_of_the_preferred_source_gives_the_price():
    chosen = selector()
    chosen.observe("coinbase:BTC-USD", row(5, 10_000))
    chosen.observe("binance:BTCUSDT", row(7, 10_000, "101.25"))
    switch = chosen.choose(10_000)
    assert switch == price.Switch("binance:BTCUSDT", None, "first trade")
    view = chosen.update(10_000)
    assert view["source"] == "binance:BTCUSDT" and view["p"] == "101.25" and view["id"] == "7"
    assert view["quote"] == "USDT" and view["since"] == "10000"


def test_a_quiet_preferred_source_hands_the_price_to_the_next_live_one_and_gets_it_back():
    chosen = selector()
    chosen.observe("binance:BTCUSDT", row(1, 10_000))
    chosen.choose(10_000)
    chosen.observe("coinbase:BTC-USD", row(50, 10_900, "99.0"))
    assert chosen.choose(10_900) is None                  # binance heard 900 ms ago: still live
    chosen.observe("coinbase:BTC-USD", row(51, 11_500, "99.5"))
    switch = chosen.choose(11_500)
    assert switch.source == "coinbase:BTC-USD" and switch.previous == "binance:BTCUSDT"
    assert "quiet" in switch.reason
    assert chosen.update(11_500)["p"] == "99.5"
    chosen.observe("binance:BTCUSDT", row(2, 12_000))
    switch = chosen.choose(12_000)
    assert switch.source == "binance:BTCUSDT" and switch.reason == "preferred source live again"


def test_a_quiet_market_is_no_reason_to_switch():
    chosen = selector()
    chosen.observe("binance:BTCUSDT", row(1, 10_000))
    chosen.choose(10_000)
    assert chosen.choose(60_000) is None
    assert chosen.current == "binance:BTCUSDT"


def test_the_price_never_goes_back_to_an_older_trade_of_its_source():
    chosen = selector()
    chosen.observe("binance:BTCUSDT", row(10, 10_000, "1.0"))
    chosen.choose(10_000)
    assert chosen.update(10_000)["id"] == "10"
    chosen.observe("binance:BTCUSDT", row(4, 10_100, "2.0"))    # a backfilled older trade
    assert chosen.update(10_100) is None
    chosen.observe("binance:BTCUSDT", row(11, 10_200, "3.0"))
    assert chosen.update(10_200)["p"] == "3.0"


def test_a_restarted_writer_carries_on_from_the_stored_view():
    chosen = price.PriceSelector(ORDER, STALE, current="coinbase:BTC-USD", current_id=40)
    chosen.observe("coinbase:BTC-USD", row(39, 10_000))
    assert chosen.choose(10_000) is None and chosen.update(10_000) is None
    chosen.observe("coinbase:BTC-USD", row(41, 10_000))
    assert chosen.update(10_000)["id"] == "41"


def test_sources_outside_the_order_are_ignored():
    chosen = price.PriceSelector(ORDER[:1], STALE)
    chosen.observe("kraken:BTC/USD", row(1, 10_000))
    assert chosen.choose(10_000) is None and chosen.current is None


@pytest.mark.parametrize("source, quote", [
    ("binance:BTCUSDT", "USDT"), ("binance:BTCFDUSD", "FDUSD"), ("coinbase:BTC-USD", "USD"),
    ("kraken:BTC/EUR", "EUR"), ("binance:XYZ", "")])
def test_the_quote_currency_comes_from_the_symbol(source, quote):
    assert price.quote_of(source) == quote


def test_the_newest_row_is_read_without_decoding_the_batch():
    batch = encode_batch([Trade(1, "1.5", "0.2", "buy", 5, 6), Trade(2, "2.5", "0.3", "sell", 7, 8)])
    assert price.newest_row(batch)[:6] == [2, "2.5", "0.3", "sell", 7, 8]


def test_two_hosts_writing_one_primary_never_put_back_an_older_trade_of_the_same_source(redis_server):
    """Two feed hosts write the primary's price view, one a few trades behind the other: the view only
    moves forward within a source, and a host's move to another source is kept (a real Redis runs the
    same script the writer sends)."""
    client = redis_server.client()

    def write(source: str, trade_id: int, p: str) -> None:
        fields = price.view_fields(source, row(trade_id, 10_000, p), 1)
        client.execute_command(*price.write_view_command(fields))

    write("binance:BTCUSDT", 10, "10.0")       # host A
    write("binance:BTCUSDT", 9, "9.0")         # host B, behind: refused
    write("binance:BTCUSDT", 10, "10.0")       # host B catches up with the same trade: no change
    assert price.read_view(client)["id"] == "10" and price.read_view(client)["p"] == "10.0"
    write("binance:BTCUSDT", 11, "11.0")
    assert price.read_view(client)["p"] == "11.0"
    write("coinbase:BTC-USD", 3, "99.0")       # a host moved to coinbase: kept, whatever its id
    assert price.read_view(client)["source"] == "coinbase:BTC-USD"
    write("coinbase:BTC-USD", 2, "98.0")
    assert price.read_view(client)["p"] == "99.0"
    write("binance:BTCUSDT", 5, "5.0")         # back to binance: a switch is kept
    assert price.read_view(client)["source"] == "binance:BTCUSDT" and price.read_view(client)["id"] == "5"
    client.close()
