"""The Python client (btcfeed.client.Feed) against real servers: a primary written by the real apply
script or by a real stack fed by the exchange simulator, compared id by id with the simulator."""

import io
import os
import socket
import subprocess
import threading
import time

import pytest

from btcfeed import keys
from btcfeed.client import (SOURCE_PATTERN, Candle, Feed, FeedError, FeedUnavailable, Trade, UnknownSource,
                            _SSE)
from btcfeed.storage.apply import BatchApplier, read_candles
from btcfeed.trade import Trade as StoredTrade
from tools import verify
from tools.redis_process import free_port
from harness import SOURCE, drain, primary_last_id, remove_stack, start_stack, wait_for, writer_state

RATE = 1000
SEED = 23


# --- helpers --------------------------------------------------------------------------------------

class Collector:
    """Runs a follow() in a thread and keeps what it yields (and what it raised)."""

    def __init__(self, feed: Feed, after_id=None):
        self.feed = feed
        self.follower = feed.follow(after_id)
        self.trades = []
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for trade in self.follower:
                self.trades.append(trade)
        except BaseException as exc:        # kept for the test to assert on
            self.error = exc

    def ids(self) -> list:
        return [trade.id for trade in self.trades]

    def wait_until(self, last_id: int, timeout_s: float):
        wait_for(lambda: self.error is not None or (self.follower.watermark or -1) >= last_id, timeout_s,
                 f"the client to deliver up to trade {last_id} (watermark {self.follower.watermark}, "
                 f"backend {self.feed.backend})")
        assert self.error is None, repr(self.error)

    def stop(self):
        self.follower.close()
        self.thread.join(10)
        assert not self.thread.is_alive()


def assert_exactly_the_exchanges(trades, sim, from_id: int, to_id: int):
    """Every exchange trade from_id..to_id exactly once, field by field, and nothing else."""
    ids = [trade.id for trade in trades]
    duplicated = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
    assert not duplicated, f"duplicated: {duplicated[:10]}"
    expected = verify.exchange_trades(sim.client, from_id, to_id)
    assert expected and expected[0].id == from_id and expected[-1].id == to_id
    assert sorted(ids) == [t.id for t in expected], (
        f"missing {sorted(set(t.id for t in expected) - set(ids))[:10]}, "
        f"unexpected {sorted(set(ids) - set(t.id for t in expected))[:10]}")
    by_id = {trade.id: trade for trade in trades}
    mismatched = [(want, by_id[want.id]) for want in expected
                  if (by_id[want.id].p, by_id[want.id].q, by_id[want.id].side, by_id[want.id].ts)
                  != (want.p, want.q, want.side, want.ts)]
    assert not mismatched, mismatched[:3]


def stored(trade_id: int, now_ms: int) -> StoredTrade:
    return StoredTrade(trade_id, f"{97000 + trade_id}.25", "0.0015", "buy" if trade_id % 2 else "sell",
                       now_ms - 10_000 + trade_id, now_ms)


@pytest.fixture
def applier(redis_server):
    """The real apply script on a real redis-server: the primary's layout, written as the feed writes it."""
    return BatchApplier(redis_server.client(), retention_ms=3_600_000)


def write(applier, ids, now_ms=None):
    now_ms = now_ms or int(time.time() * 1000)
    applier.apply_trades(SOURCE, [stored(i, now_ms) for i in ids])


# --- the SSE parser, over bytes as a server sends them -----------------------------------------------

class Trickle(io.RawIOBase):
    """A raw stream that hands out a few bytes per read, so lines and events arrive cut anywhere."""

    def __init__(self, data: bytes, step: int):
        self.data, self.step, self.offset = data, step, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        chunk = self.data[self.offset:self.offset + min(self.step, len(buffer))]
        buffer[:len(chunk)] = chunk
        self.offset += len(chunk)
        return len(chunk)


@pytest.mark.parametrize("step", [1, 3, 7, 4096])
def test_sse_events_cut_anywhere_come_out_whole(step):
    body = (b": keep-alive\r\n\r\n"
            b"id: 5\r\ndata: {\"id\":5,\"p\":\"1.5\",\"q\":\"2\",\"side\":\"buy\",\"ts\":1,\"rts\":2}\r\n\r\n"
            b"event: notice\ndata: first line\ndata:second line\n\n"
            b"retry: 1000\n\n"
            b"id:6\ndata:{\"id\":6,\"p\":\"1.6\",\"q\":\"3\",\"side\":\"sell\",\"ts\":3,\"rts\":4}\n\n"
            b"data: unterminated")
    stream = _SSE(io.BufferedReader(Trickle(body, step), buffer_size=max(step, 8)))
    events = []
    while (event := stream.next_event()) is not None:
        events.append(event)
    assert [name for name, _ in events] == ["message", "notice", "message"]
    assert events[1][1] == "first line\nsecond line"
    assert Trade.from_fields(__import__("json").loads(events[2][1])) == Trade(6, "1.6", "3", "sell", 3, 4)


# --- misuse --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({}, "primary_url or at least one api_url"),
    ({"primary_url": "http://127.0.0.1:6379"}, "redis://"),
    ({"primary_url": "127.0.0.1:6379"}, "redis://"),
    ({"primary_url": "redis://127.0.0.1:notaport/0"}, "primary_url"),
    ({"api_urls": ["ftp://feed:8078"]}, "http://"),
    ({"api_urls": ["http://"]}, "http://"),
    ({"api_urls": ["http://feed:99999999"]}, "port"),
    ({"api_urls": ["http://feed:8078"], "source": "BTCUSDT"}, "exchange:SYMBOL"),
    ({"api_urls": ["http://feed:8078"], "source": "Binance:BTCUSDT"}, "exchange:SYMBOL"),
])
def test_bad_arguments_are_refused_at_once_with_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Feed(**kwargs)


def test_sources_of_every_exchange_are_accepted():
    for source in ("binance:BTCUSDT", "coinbase:BTC-USD", "kraken:BTC/USD"):
        assert SOURCE_PATTERN.fullmatch(source)


def test_nothing_reachable_is_one_clear_error_quickly():
    dead_redis, dead_api = free_port(), free_port()     # nothing listens on either
    feed = Feed(f"redis://127.0.0.1:{dead_redis}/0", api_urls=[f"http://127.0.0.1:{dead_api}"],
                timeout=0.3, unavailable_s=1)
    started = time.monotonic()
    calls = (feed.last, feed.price, lambda: feed.trades(0), feed.candles, lambda: next(iter(feed.follow(1))))
    for call in calls:
        with pytest.raises(FeedUnavailable) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and "no backend answered" in message
        assert str(dead_redis) in message and str(dead_api) in message
    assert time.monotonic() - started < 10
    assert issubclass(FeedUnavailable, FeedError)


@pytest.mark.integration
def test_following_with_every_backend_gone_ends_with_feed_unavailable(redis_server, applier):
    write(applier, range(1, 11))
    feed = Feed(redis_server.url, timeout=0.3, unavailable_s=1.5)
    collector = Collector(feed, after_id=5)
    collector.wait_until(10, 10)
    redis_server.kill()
    wait_for(lambda: collector.error is not None, 10, "follow() to give up")
    assert isinstance(collector.error, FeedUnavailable), repr(collector.error)
    assert "no backend answered" in str(collector.error)
    assert collector.ids() == [6, 7, 8, 9, 10]


@pytest.mark.integration
def test_an_unknown_source_is_refused_by_every_read(redis_server, applier):
    write(applier, range(1, 5))
    feed = Feed(redis_server.url, source="kraken:BTC/USD")
    for call in (feed.last, lambda: feed.trades(0), feed.candles, lambda: next(iter(feed.follow()))):
        with pytest.raises(UnknownSource, match="kraken:BTC/USD"):
            call()
    assert isinstance(UnknownSource("x"), LookupError)


# --- the primary: stream order is not id order ---------------------------------------------------------

@pytest.mark.integration
def test_trades_are_in_id_order_and_stop_before_a_hole(redis_server, applier):
    now_ms = int(time.time() * 1000)
    write(applier, range(1, 11), now_ms)
    write(applier, range(14, 20), now_ms)    # 11..13 are missing, as before a backfill
    feed = Feed(redis_server.url)
    assert [t.id for t in feed.trades(0, 100)] == list(range(1, 11))
    assert [t.id for t in feed.trades(3, 4)] == [4, 5, 6, 7]
    assert feed.trades(10) == []
    assert [t.id for t in feed.trades(13)] == list(range(14, 20))
    write(applier, range(11, 14), now_ms)    # the backfill lands behind the later trades
    assert [t.id for t in feed.trades(0, 100)] == list(range(1, 20))
    assert feed.trades(8, 3) == [Trade(*stored(i, now_ms)) for i in (9, 10, 11)]
    assert feed.last() == Trade(*stored(19, now_ms))


@pytest.mark.integration
def test_trades_before_the_retained_ones_start_at_the_oldest_kept(redis_server, applier):
    write(applier, range(500, 510))
    feed = Feed(redis_server.url)
    assert [t.id for t in feed.trades(3, 5)] == [500, 501, 502, 503, 504]


@pytest.mark.integration
def test_follow_finds_trades_written_ahead_of_a_hole(redis_server, applier):
    """Stream order 1..10, 14..19, 11..13: following after 12 must still yield 14..19, which stand
    before 12 in the stream (a scan back that stopped at the first id <= 12 would pass them by)."""
    write(applier, range(1, 11))
    write(applier, range(14, 20))
    write(applier, range(11, 14))
    feed = Feed(redis_server.url)
    collector = Collector(feed, after_id=12)
    collector.wait_until(19, 10)
    write(applier, range(5, 25))             # a replay of old trades with new ones behind
    collector.wait_until(24, 10)
    collector.stop()
    assert sorted(collector.ids()) == list(range(13, 25))
    assert len(collector.ids()) == len(set(collector.ids()))


@pytest.mark.integration
def test_follow_yields_in_arrival_order_and_fills_holes_once(redis_server, applier):
    write(applier, range(1, 11))
    feed = Feed(redis_server.url)
    collector = Collector(feed)              # after the newest trade now: 10
    time.sleep(0.3)
    write(applier, range(14, 17))
    write(applier, range(11, 15))            # 14 again, with the hole
    write(applier, [17])
    collector.wait_until(17, 10)
    collector.stop()
    assert collector.ids() == [14, 15, 16, 11, 12, 13, 17]
    assert collector.follower.stats()["pending"] == 0
    assert feed.stats() == {"backend": "primary", "switches": 0}


@pytest.mark.integration
def test_a_hole_no_backend_fills_is_given_up_on_and_still_delivered_if_it_turns_up(redis_server, applier):
    write(applier, range(1, 6))
    feed = Feed(redis_server.url, hole_s=0.5)
    collector = Collector(feed, after_id=5)
    write(applier, range(8, 12))             # 6 and 7 missing
    wait_for(lambda: collector.follower.watermark == 11, 10, "the watermark to pass the hole")
    assert collector.follower.stats()["skipped"] == [(6, 7)]
    write(applier, [7, 12])
    wait_for(lambda: len(collector.trades) == 6, 10, "the late trade")
    collector.stop()
    assert collector.ids() == [8, 9, 10, 11, 7, 12]
    assert collector.follower.stats()["skipped"] == [(6, 6)]


# --- against a real stack fed by the exchange simulator ----------------------------------------------------

@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


@pytest.mark.integration
def test_reads_match_the_primary_and_follow_matches_the_exchange(primary, primary_client, sim, stack):
    wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
    start = primary_last_id(primary_client)
    feed = Feed(primary.url)
    collector = Collector(feed, after_id=start)
    wait_for(lambda: primary_last_id(primary_client) > start + 2 * RATE, 20, "two seconds of trades")
    last_id = drain(primary_client, sim)
    collector.wait_until(last_id, 20)
    collector.stop()
    assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
    assert feed.stats() == {"backend": "primary", "switches": 0}

    newest = feed.last()
    raw = {k.decode(): v.decode() for k, v in primary_client.hgetall(keys.last(SOURCE)).items()}
    assert newest == Trade.from_fields(raw) and newest.id == last_id
    page = feed.trades(start, 500)
    assert [t.id for t in page] == list(range(start + 1, start + 501))
    assert_exactly_the_exchanges(page, sim, start + 1, start + 500)
    assert feed.candles() == [Candle(t=minute, **{name: c[name] for name in ("o", "h", "l", "c", "v", "n")},
                                     fid=c["fid"], lid=c["lid"])
                              for minute, c in sorted(read_candles(primary_client, SOURCE).items())]
    newest_minute = feed.candles()[-1].t
    assert [c.t for c in feed.candles(newest_minute, newest_minute + 60_000)] == [newest_minute]
    assert feed.candles(newest_minute + 1, newest_minute + 60_000) == []


def test_dead_port_is_refused_not_hung():
    """A timeout bounds every request: a listener that never answers is a failure, not a hang."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        feed = Feed(api_urls=[f"http://127.0.0.1:{port}"], timeout=0.3)
        started = time.monotonic()
        with pytest.raises(FeedUnavailable, match="timed out"):
            feed.last()
        assert time.monotonic() - started < 3


# --- switching between the primary and feed hosts' read APIs (the api process of a real stack) --------------

def api_url(stack) -> str:
    return f"http://{stack.env['BTCFEED_API_ADDR']}"


@pytest.fixture
def secured_stack(primary, sim):
    running = start_stack(primary, sim, BTCFEED_API_TOKEN="client-test-token-0123456789")
    yield running
    remove_stack(running)


@pytest.mark.integration
def test_the_read_api_alone_serves_what_the_primary_holds(primary, primary_client, sim, secured_stack):
    api = api_url(secured_stack)
    wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
    feed = Feed(api_urls=[api], api_token="client-test-token-0123456789")
    wait_for(lambda: feed.trades(primary_last_id(primary_client) - 1, 1), 10, "the read view to catch up")
    start = primary_last_id(primary_client)
    collector = Collector(feed, after_id=start)
    wait_for(lambda: primary_last_id(primary_client) > start + RATE, 20, "a second of trades")
    last_id = drain(primary_client, sim)
    collector.wait_until(last_id, 20)
    collector.stop()
    assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
    assert feed.stats() == {"backend": api, "switches": 0}

    direct = Feed(primary.url)
    wait_for(lambda: feed.last() == direct.last(), 10, "the view to hold the newest trade")
    assert feed.trades(start, 300) == direct.trades(start, 300)
    assert [t.id for t in feed.trades(start, 300)] == list(range(start + 1, start + 301))
    assert feed.candles() == direct.candles() and feed.candles()
    assert direct.price() is not None and feed.price() == direct.price()

    with pytest.raises(UnknownSource, match="kraken:BTC/USD"):
        Feed(api_urls=[api], api_token="client-test-token-0123456789", source="kraken:BTC/USD").last()
    for token in (None, "wrong"):
        with pytest.raises(FeedError, match="401") as refused:
            Feed(api_urls=[api], api_token=token).last()
        assert not isinstance(refused.value, FeedUnavailable)


@pytest.mark.integration
def test_follow_across_a_primary_sigkill_and_its_return(primary, primary_client, sim, stack):
    api = api_url(stack)
    wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
    start = primary_last_id(primary_client)
    feed = Feed(primary.url, api_urls=[api])
    collector = Collector(feed, after_id=start)
    collector.wait_until(start + RATE, 10)
    primary.kill()
    wait_for(lambda: feed.backend == api, 5, "the client to switch to the read API")
    at_switch = collector.follower.watermark
    collector.wait_until(at_switch + 2 * RATE, 10)             # trades keep coming through the API
    primary.start()
    wait_for(lambda: writer_state(stack) == "primary", 60, "the feed's hand-back to the primary")
    wait_for(lambda: feed.backend == "primary", 20, "the client to return to the primary")
    back = collector.follower.watermark
    collector.wait_until(back + RATE, 10)
    last_id = drain(primary_client, sim)
    collector.wait_until(last_id, 20)
    collector.stop()
    assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
    assert feed.switches >= 2 and feed.backend == "primary"


@pytest.mark.integration
def test_two_feed_hosts_cover_each_other_while_the_primary_is_down(primary, primary_client, sim):
    first, second = start_stack(primary, sim), start_stack(primary, sim)
    try:
        wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
        start = primary_last_id(primary_client)
        feed = Feed(primary.url, api_urls=[api_url(first), api_url(second)])
        collector = Collector(feed, after_id=start)
        collector.wait_until(start + RATE, 10)
        primary.kill()
        wait_for(lambda: feed.backend == api_url(first), 5, "the client to switch to the first host")
        collector.wait_until(collector.follower.watermark + RATE, 10)
        first.stop("api")
        wait_for(lambda: feed.backend == api_url(second), 10, "the client to switch to the second host")
        collector.wait_until(collector.follower.watermark + 2 * RATE, 10)
        primary.start()
        wait_for(lambda: writer_state(first) == "primary" and writer_state(second) == "primary", 60,
                 "both feed hosts' hand-back to the primary")
        wait_for(lambda: feed.backend == "primary", 20, "the client to return to the primary")
        last_id = drain(primary_client, sim)
        collector.wait_until(last_id, 20)
        collector.stop()
        assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
        # primary -> first host -> second host -> primary, with no detour to the dead primary between
        assert feed.switches == 3
    finally:
        remove_stack(second)
        remove_stack(first)


def btcfeed_command(stack, *args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([os.path.join(root, "bin", "btcfeed"), *args], env=stack.env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.integration
def test_a_primary_paused_for_maintenance_stalls_and_the_client_reads_the_api_meanwhile(
        primary, primary_client, sim, stack):
    """The primary answers throughout but gets no trades while paused: the client notices that it
    gives nothing new while the read API does, reads the API, and returns after the resume."""
    api = api_url(stack)
    wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
    start = primary_last_id(primary_client)
    feed = Feed(primary.url, api_urls=[api], stall_s=1.0)
    collector = Collector(feed, after_id=start)
    collector.wait_until(start + RATE, 10)
    btcfeed_command(stack, "primary", "pause", "--reason", "client test")
    wait_for(lambda: feed.backend == api, 10, "the client to leave the stalled primary")
    frozen = primary_last_id(primary_client)
    collector.wait_until(frozen + 2 * RATE, 10)               # well past what the primary holds
    assert primary_last_id(primary_client) == frozen
    btcfeed_command(stack, "primary", "resume")
    wait_for(lambda: feed.backend == "primary", 20, "the client to return to the primary")
    last_id = drain(primary_client, sim)
    collector.wait_until(last_id, 20)
    collector.stop()
    assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
    assert feed.switches == 2


def test_importing_the_client_loads_nothing_else_of_btcfeed_or_its_other_dependencies():
    """What a consumer with the wheel (installed without its dependencies) and redis-py runs."""
    import sys
    probe = ("import sys, btcfeed.client; "
             "print(' '.join(sorted(name for name in sys.modules if '.' not in name)))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": ""}).stdout.split()
    assert "redis" in loaded and "btcfeed" in loaded
    others = {"orjson", "websocket", "supervisor", "click", "psutil", "rich", "prometheus_client", "urllib3",
              "tools"}
    assert not others & set(loaded), others & set(loaded)
    ours = subprocess.run([sys.executable, "-c", "import sys, btcfeed.client; print(' '.join(sorted("
                           "name for name in sys.modules if name.startswith('btcfeed'))))"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert ours == ["btcfeed", "btcfeed.client", "btcfeed.keys"]


@pytest.mark.integration
def test_a_black_holed_primary_is_a_failure_within_the_timeout(redis_server, applier):
    """SIGSTOP: the port accepts but nothing answers; every read gives up after the timeout."""
    write(applier, range(1, 11))
    feed = Feed(redis_server.url, timeout=0.3, unavailable_s=1)
    collector = Collector(feed, after_id=5)
    collector.wait_until(10, 10)
    redis_server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(FeedUnavailable, match="[Tt]imeout|timed out"):
            feed.last()
        assert time.monotonic() - started < 2
        wait_for(lambda: collector.error is not None, 10, "follow() to give up on a silent primary")
        assert isinstance(collector.error, FeedUnavailable), repr(collector.error)
    finally:
        redis_server.thaw()


@pytest.mark.integration
@pytest.mark.slow
def test_follow_across_a_black_holed_primary(primary, primary_client, sim, stack):
    api = api_url(stack)
    wait_for(lambda: primary_last_id(primary_client) > 0, 30, "trades in the primary")
    start = primary_last_id(primary_client)
    feed = Feed(primary.url, api_urls=[api])
    collector = Collector(feed, after_id=start)
    collector.wait_until(start + RATE, 10)
    primary.freeze()
    try:
        wait_for(lambda: feed.backend == api, 5, "the client to leave the silent primary")
        collector.wait_until(collector.follower.watermark + 2 * RATE, 10)
    finally:
        primary.thaw()
    wait_for(lambda: writer_state(stack) == "primary", 60, "the feed's hand-back to the primary")
    wait_for(lambda: feed.backend == "primary", 20, "the client to return to the primary")
    last_id = drain(primary_client, sim)
    collector.wait_until(last_id, 20)
    collector.stop()
    assert_exactly_the_exchanges(collector.trades, sim, start + 1, last_id)
    assert feed.switches == 2
