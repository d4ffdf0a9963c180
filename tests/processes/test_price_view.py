"""The price view follows BTCFEED_PRICE_SOURCES: when the preferred exchange stalls while another one
trades, the price (btcfeed:price in the primary and the local Redis, and the compatibility keys) comes
from the next source, tagged with it, and returns when the preferred one trades again; each switch is
an event. Real stack, two exchange simulators."""

import signal

import pytest

from btcfeed import keys
from btcfeed.events import recent_events
from harness import Simulator, local_client, remove_stack, start_sources_stack, wait_for

pytestmark = pytest.mark.integration
STALE_MS = 1000


@pytest.fixture
def sims():
    started = {"binance": Simulator(rate=300, mode="binance"),
               "coinbase": Simulator(rate=200, mode="coinbase")}
    yield started
    for sim in started.values():
        if sim.process.poll() is None:
            sim.process.send_signal(signal.SIGCONT)
            sim.stop()


def view(client) -> dict:
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.PRICE).items()}


def from_source(client, source: str) -> bool:
    """The view names the source and carries one of its recent trades, and the compat price is it."""
    current = view(client)
    if current.get("source") != source:
        return False
    newest = int(client.hget(keys.last(source), "id") or -1)
    return newest - int(current["id"]) < 2000 and client.get(keys.COMPAT_LAST_PRICE).decode() == current["p"]


def switches(stack) -> list:
    """The price source switches, oldest first."""
    events = reversed(recent_events(local_client(stack), 500))
    return [e["fields"] for e in events if e["event"] == "price_source_switch"]


def test_the_price_moves_to_the_next_source_while_the_preferred_one_stalls_and_back(
        primary_client, primary, sims):
    binance, coinbase = sims["binance"].source, sims["coinbase"].source
    stack = start_sources_stack(primary, sims.values(), BTCFEED_PRICE_STALE_MS=str(STALE_MS))
    try:
        wait_for(lambda: from_source(primary_client, binance), 30, "the price from the preferred source")
        assert view(primary_client)["quote"] == "USDT"
        sims["binance"].client.pause()
        wait_for(lambda: from_source(primary_client, coinbase), 10, "the price from the next source")
        during = view(primary_client)
        assert during["quote"] == "USD"
        wait_for(lambda: int(view(primary_client)["id"]) > int(during["id"]), 5, "the price to keep moving")
        assert view(local_client(stack))["source"] == coinbase          # what the read API serves
        sims["binance"].client.resume()
        wait_for(lambda: from_source(primary_client, binance), 10, "the price back on the preferred source")
        said = switches(stack)
        assert [(s["previous"], s["source"]) for s in said][-2:] == [(binance, coinbase), (coinbase, binance)]
        assert "quiet" in said[-2]["reason"] and said[-1]["reason"] == "preferred source live again"
    finally:
        remove_stack(stack)
