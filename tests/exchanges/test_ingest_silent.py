"""Silent faults on the ingest side: an implausible forward id (a forged or corrupt trade, heartbeat or
cut message) is quarantined until REST confirms it and never blackholes the source; REST that lags
the stream keeps a gap waiting instead of giving it up; REST answers are bounded in size and time;
one invalid REST row is dead-lettered without holding up the source or skipping a valid id;
impossible dates are refused; and a change of Binance record kind never reuses the other kind's
cursor. Against real redis-server processes, the real stack and the exchange simulator."""

import http.server
import json
import os
import threading
import time

import pytest
import redis

from btcfeed.exchanges import binance

from btcfeed import keys
from btcfeed.storage.bus import Bus
from btcfeed.config import Source, load
from btcfeed.events import recent_events
from btcfeed.exchanges.base import RateLimited, RestClient, RestError, TradePage, RejectedRow, iso_to_ms
from btcfeed.trade import BadMessage, Trade, decode_batch
from harness import (Simulator, assert_exact, drain, primary_last_id, remove_stack, start_stack,
                     verify_primary, wait_for, wait_source_trades)
from btcfeed.processes.ingest import SourceFeed

RATE = 1000
SOURCE = "binance:BTCUSDT"


class SilentLog:
    def __getattr__(self, name):
        return lambda *args, **fields: None


# --- dates ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["2024-02-31T00:00:00Z", "2023-02-29T12:00:00Z", "2024-04-31T00:00:00.5Z"])
def test_impossible_dates_are_refused_and_real_month_ends_kept(text):
    with pytest.raises(BadMessage, match="not a valid date"):
        iso_to_ms("trade time", text)
    assert iso_to_ms("t", "2024-02-29T00:00:00Z") == 1709164800000        # a leap day
    assert iso_to_ms("t", "2024-04-30T23:59:59.999Z") == 1714521599999


# --- REST answers: size cap and total deadline ------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.path == "/declared-huge":
            self.send_header("Content-Length", str(17 << 20))
            self.end_headers()
            self.wfile.write(b"[" * 1024)
        elif self.path == "/undeclared-huge":
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b" " * (1 << 20)
            for _ in range(17):
                self.wfile.write(chunk)
        elif self.path == "/drip":
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):           # a byte every 0.1 s: never silent long enough for a timeout
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.1)


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/declared-huge", "/undeclared-huge"])
def test_rest_answer_over_the_size_cap_is_a_rest_error(http_server, path):
    client = RestClient(http_server)
    with pytest.raises(RestError, match="byte limit"):
        client.get_json(path)


def test_rest_answer_dripping_past_the_total_deadline_is_a_rest_error(http_server, monkeypatch):
    started = time.monotonic()
    with pytest.raises(RestError, match="deadline"):
        RestClient(http_server, timeout_s=5.0).get_json("/drip", deadline_s=1.0)
    assert time.monotonic() - started < 2.5
    # Binance's own client has the same bound.
    monkeypatch.setattr(binance, "REST_DEADLINE_S", 1.0)
    client = binance.BinanceRest(http_server, "BTCUSDT")
    started = time.monotonic()
    with pytest.raises(RestError, match="deadline"):
        client._get("/drip")
    assert time.monotonic() - started < 2.5


# --- REST keep-alive: one connection for many pages; errors stay one line ---------------------------

class KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"           # keeps the connection open between requests
    disable_nagle_algorithm = True          # headers and body go in two writes: no 40 ms stall

    def log_message(self, *args):
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/api/v3/historicalTrades":
            first = int(dict(item.split("=") for item in query.split("&"))["fromId"])
            rows = [{"id": i, "price": "100.5", "qty": "0.1", "time": 1_700_000_000_000 + i,
                     "isBuyerMaker": True} for i in range(first, first + binance.REST_PAGE_LIMIT)]
            self.answer(200, json.dumps(rows).encode(), {"X-MBX-USED-WEIGHT-1M": "25"})
        elif path == "/busy":
            self.answer(429, b'{"msg": "slow down"}', {"Retry-After": "7"})
        elif path == "/banned":
            self.answer(418, b'{"msg": "banned"}', {})
        elif path == "/broken":
            self.answer(500, b'{"msg": "first line\\nsecond line"}', {})
        else:
            self.answer(200, b'{"page": "%s"}' % path.encode(), {})

    def answer(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class CountingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    connections = 0

    def get_request(self):
        self.connections += 1
        return super().get_request()


@pytest.fixture
def counting_server():
    server = CountingServer(("127.0.0.1", 0), KeepAliveHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_many_rest_pages_share_one_connection(counting_server):
    server, url = counting_server
    client = RestClient(url)
    pages = [client.get_json(f"/page/{n}")[0] for n in range(60)]
    assert pages[-1] == {"page": "/page/59"} and server.connections == 1
    # Errors and rate limits leave the kept connection usable too.
    with pytest.raises(RestError):
        client.get_json("/broken")
    client.get_json("/page/again")
    assert server.connections == 1
    client.close()
    client.get_json("/page/after-close")                  # closed: the next request opens a new one
    assert server.connections == 2


def test_binance_backfill_pages_share_one_connection(counting_server):
    server, url = counting_server
    adapter = binance.BinanceAdapter("BTCUSDT", "ws://127.0.0.1:1", url, kind="trade")
    first = 1_000
    for page_number in range(10):
        page, exhausted = adapter.fetch_page(first + page_number * binance.REST_PAGE_LIMIT)
        assert len(page) == binance.REST_PAGE_LIMIT and not exhausted
    assert page[-1].id == first + 10 * binance.REST_PAGE_LIMIT - 1
    assert server.connections == 1 and adapter.rest.used_weight == 25
    adapter.close()


def test_rate_limits_and_errors_are_one_line_rest_errors(counting_server):
    _, url = counting_server
    with pytest.raises(RateLimited) as limited:
        RestClient(url).get("/busy")
    assert limited.value.retry_after_s == 7.0
    rest = binance.BinanceRest(url, "BTCUSDT")
    with pytest.raises(RateLimited) as banned:                  # Binance's ban is a rate limit too
        rest._get("/banned")
    assert banned.value.retry_after_s == binance.DEFAULT_RETRY_AFTER_S
    with pytest.raises(RestError) as broken:
        RestClient(url).get("/broken")
    assert str(broken.value) == "HTTP 500 from /broken: first line second line"
    with pytest.raises(RestError) as refused:
        RestClient("http://127.0.0.1:1").get("/x")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("cannot reach http://127.0.0.1:1/x: ")


# --- the sequencer against a real local Redis (no network) ------------------------------------------

@pytest.fixture
def bus(redis_server):
    client = redis_server.client()
    client.flushall()
    return Bus(client, max_entries=10_000, deadletter_max=100)


def feed_for(bus, kind="trade"):
    return SourceFeed(Source("binance", "BTCUSDT"), load({"BTCFEED_BINANCE_TRADE_KIND": kind}), bus,
                      SilentLog(), threading.Event())


def trade(trade_id, rts=None):
    now = int(time.time() * 1000)
    return Trade(trade_id, "100.5", "0.1", "buy", now, rts or now)


def bus_ids(bus) -> list:
    return [t.id for _, fields in bus.client.xrange(keys.BUS) for t in decode_batch(fields[b"t"])]


def events(bus, name) -> list:
    return [e for e in recent_events(bus.client, 1000) if e["event"] == name]


def test_one_forged_forward_id_is_quarantined_and_the_real_trades_keep_flowing(bus):
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(i) for i in range(100, 103)], 0.0)
    feed.handle("trades", None, [trade(10**12)], 0.0)               # forged: far beyond any exchange
    feed.handle("trades", None, [trade(i) for i in range(103, 106)], 0.0)
    feed.flush()
    assert bus_ids(bus) == list(range(100, 106)) and bus.cursor(SOURCE) == 105 and bus.gaps(SOURCE) == {}
    assert feed.counts["duplicates"] == 0 and len(feed.quarantine) == 1
    # REST skips it: dropped, never a trade, never the cursor.
    feed.handle("quarantine", None, (10**12, False, "REST skips it"), 0.0)
    feed.flush()
    assert len(feed.quarantine) == 0 and feed.counts["quarantine_dropped"] == 1
    assert bus_ids(bus) == list(range(100, 106)) and bus.cursor(SOURCE) == 105
    assert len(events(bus, "implausible_id_dropped")) == 1


def test_a_later_trade_with_a_lower_id_refutes_a_quarantined_heartbeat(bus):
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(100)], 0.0)
    feed.handle("heartbeat", None, 10**12, 0.0)
    assert len(feed.quarantine) == 1 and bus.gaps(SOURCE) == {} and feed.last_id == 100
    soon = trade(101)
    feed.handle("trades", None, [soon], 0.0)                        # too soon to tell: still held
    assert len(feed.quarantine) == 1
    later = Trade(102, "100.5", "0.1", "buy", soon.ts + 6_000, soon.rts + 6_000)
    feed.handle("trades", None, [later], 0.0)
    feed.flush()
    assert len(feed.quarantine) == 0 and feed.counts["quarantine_dropped"] == 1
    assert bus_ids(bus) == [100, 101, 102] and bus.cursor(SOURCE) == 102


def test_a_confirmed_far_jump_records_the_gap_and_releases_what_was_held(bus):
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(100)], 0.0)
    far = 100 + 10**9
    feed.handle("trades", None, [trade(far), trade(far + 1)], 0.0)
    feed.flush()
    assert len(feed.quarantine) == 2 and bus.cursor(SOURCE) == 100
    feed.backfiller.adapter.fetch_page = lambda from_id, after=None: (TradePage([trade(from_id)]), True)
    feed.backfiller.adapter.rest_pause_s = lambda: 0.0
    assert feed.backfiller.ask_about_quarantine()
    kind, _, data = feed.inbox.get_nowait()
    feed.handle(kind, None, data, 0.0)
    feed.flush()
    assert bus_ids(bus) == [100, far, far + 1] and len(feed.quarantine) == 0
    assert {f: (g.first, g.last) for f, g in bus.gaps(SOURCE).items()} == {"101": (101, far - 1)}


def test_a_forged_id_rest_never_has_does_not_hold_up_a_real_far_jump(bus):
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(100)], 0.0)
    feed.flush()
    forged, real = 100 + 10**6, 100 + 10**9          # both beyond belief; REST only has the real one
    feed.handle("trades", None, [trade(forged)], 0.0)
    feed.handle("trades", None, [trade(real), trade(real + 1)], 0.0)

    def fetch_page(from_id, after=None):
        return TradePage([trade(from_id)] if from_id >= real else []), True

    feed.adapter.fetch_page = fetch_page
    feed.adapter.rest_pause_s = lambda: 0.0
    assert feed.backfiller.ask_about_quarantine()      # the forged one: REST has nothing yet, asked later
    assert feed.inbox.empty()
    assert feed.backfiller.ask_about_quarantine()      # the real jump's first id: REST has it
    kind, _, data = feed.inbox.get_nowait()
    feed.handle(kind, None, data, 0.0)
    feed.flush()
    assert bus_ids(bus) == [100, real, real + 1] and len(feed.quarantine) == 0
    assert {f: (g.first, g.last) for f, g in bus.gaps(SOURCE).items()} == {"101": (101, real - 1)}


def test_an_invalid_rest_row_is_dead_lettered_and_no_valid_id_is_skipped(bus):
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(3)], 0.0)
    feed.handle("trades", None, [trade(13)], 0.0)
    feed.flush()
    rows = {i: trade(i) for i in range(4, 13)}
    bad = RejectedRow("price is not a decimal string: 'NaN'", b'{"id":"?"}', None)    # its id unreadable

    def fetch_page(from_id, after=None):
        ids = [i for i in range(from_id, 13) if i != 7]
        return TradePage([rows[i] for i in ids], [bad] if from_id <= 7 else []), True

    feed.adapter.fetch_page = fetch_page
    feed.adapter.rest_pause_s = lambda: 0.0
    for _ in range(5):
        gaps = bus.gaps(SOURCE)
        if not gaps:
            break
        feed.backfiller.fill_one_page(min(gaps.values(), key=lambda g: g.first))
    assert sorted(bus_ids(bus)) == [3, 4, 5, 6, 8, 9, 10, 11, 12, 13] and bus.gaps(SOURCE) == {}
    assert bus.client.xlen(keys.DEADLETTER) == 1 and feed.counts["deadlettered"] == 1


def test_a_gap_rest_has_nothing_for_is_kept_with_backoff_and_an_alarm(bus, monkeypatch):
    import btcfeed.processes.ingest as ingest
    monkeypatch.setattr(ingest, "GAP_ALARM_AFTER_S", 0.0)
    feed = feed_for(bus)
    feed.handle("trades", None, [trade(3)], 0.0)
    feed.handle("trades", None, [trade(10)], 0.0)
    feed.flush()
    feed.adapter.fetch_page = lambda from_id, after=None: (TradePage([]), True)   # REST lags behind
    feed.adapter.rest_pause_s = lambda: 0.0
    for _ in range(30):
        feed.backfiller.fill_one_page(bus.gaps(SOURCE)["4"])
    assert {f: (g.first, g.last) for f, g in bus.gaps(SOURCE).items()} == {"4": (4, 9)}
    wait = feed.backfiller.waiting["4"]
    assert wait.tries == 30 and wait.next_at - time.monotonic() <= ingest.GAP_RETRY_CAP_S
    assert feed.backfiller._next_gap(bus.gaps(SOURCE), time.monotonic()) is None      # not asked again yet
    assert len(events(bus, "gap_waiting_for_rest")) == 1


def test_a_change_of_binance_kind_starts_the_new_kind_from_the_live_stream(bus):
    trade_feed = feed_for(bus, "trade")
    trade_feed._claim_id_space()
    trade_feed.handle("trades", None, [trade(5_000_000)], 0.0)
    trade_feed.handle("trades", None, [trade(5_000_100)], 0.0)
    trade_feed.flush()
    assert bus.cursor(SOURCE) == 5_000_100 and len(bus.gaps(SOURCE)) == 1
    agg_feed = feed_for(bus, "aggTrade")
    agg_feed._claim_id_space()
    assert bus.cursor(SOURCE) is None and bus.gaps(SOURCE) == {}
    (event,) = events(bus, "id_space_changed")
    assert event["fields"]["old"] == "trade" and event["fields"]["new"] == "aggTrade"
    assert event["fields"]["dropped_cursor"] == 5_000_100
    agg_feed.handle("trades", None, [trade(900), trade(901)], 0.0)   # far below the trade cursor
    agg_feed.flush()
    assert bus_ids(bus)[-2:] == [900, 901] and bus.cursor(SOURCE) == 901 and bus.gaps(SOURCE) == {}
    feed_for(bus, "aggTrade")._claim_id_space()                     # the same kind again: nothing to say
    assert len(events(bus, "id_space_changed")) == 1 and bus.cursor(SOURCE) == 901


# --- through the stack ----------------------------------------------------------------------------

def local(stack) -> redis.Redis:
    return redis.Redis(unix_socket_path=os.path.join(stack.state_dir, "redis.sock"), socket_timeout=5)


def ingest_counts(stack, source) -> dict:
    beat = local(stack).get(keys.heartbeat("ingest"))
    return json.loads(beat)["sources"][source] if beat else {}


def stack_events(stack, name) -> list:
    return [e for e in recent_events(local(stack), 1000) if e["event"] == name]


@pytest.fixture
def coinbase_sim():
    simulator = Simulator(rate=RATE, mode="coinbase")
    yield simulator
    simulator.stop()


@pytest.mark.integration
@pytest.mark.parametrize("mode, form", [("binance", "trade"), ("binance", "cut"), ("coinbase", "heartbeat"),
                                        ("coinbase", "trade"), ("kraken", "trade")])
def test_a_far_forward_id_never_blackholes_the_source(primary, primary_client, mode, form):
    sim = Simulator(rate=RATE, mode=mode)
    stack = start_stack(primary, sim)
    try:
        wait_source_trades(primary_client, sim, RATE // 2)
        sim.client.fault("fakeid", ahead=10**9, form=form)
        # Real trades keep landing right after it, also after a quiet moment (REST has nothing newer
        # for a few seconds); the forged id is refuted within seconds.
        wait_source_trades(primary_client, sim, RATE // 2)
        sim.client.pause()
        time.sleep(3.5)
        sim.client.resume()
        wait_source_trades(primary_client, sim, RATE)
        wait_for(lambda: ingest_counts(stack, sim.source).get("quarantine_dropped") == 1, 20,
                 "the forged id dropped")
        verdict = assert_exact(primary_client, sim)
        assert verdict.expected >= 2 * RATE
        counts = ingest_counts(stack, sim.source)
        assert counts["quarantine_dropped"] == 1 and counts["quarantine_confirmed"] == 0
        assert counts["quarantine"] == 0
        (event,) = stack_events(stack, "implausible_id_dropped")
        assert event["fields"]["id"] > sim.client.status()["last_id"] + 10**8
    finally:
        remove_stack(stack)
        sim.stop()


@pytest.mark.integration
def test_rest_lagging_the_stream_by_ten_seconds_loses_nothing(primary, primary_client, sim):
    stack = start_stack(primary, sim)
    try:
        wait_source_trades(primary_client, sim, RATE // 2)
        sim.client.fault("restlag", seconds=10)
        sim.client.fault("drop")                    # the trades missed meanwhile are on REST only 10 s later
        wait_source_trades(primary_client, sim, RATE)
        wait_for(lambda: stack_events(stack, "gap_waiting_for_rest"), 15, "the alarm while the gap waits")
        verdict = assert_exact(primary_client, sim)
        assert verdict.expected >= 2 * RATE
        assert not stack_events(stack, "gap_unfillable")
    finally:
        remove_stack(stack)


@pytest.mark.integration
def test_an_invalid_rest_row_is_dead_lettered_and_later_gaps_still_fill(primary, primary_client, sim):
    stack = start_stack(primary, sim)
    try:
        wait_source_trades(primary_client, sim, RATE // 2)
        poisoned = sim.client.status()["last_id"] + RATE // 2      # printed during the stall below
        sim.client.fault("badrow", id=poisoned)
        sim.client.fault("stall", seconds=1.5)
        time.sleep(2.0)
        wait_source_trades(primary_client, sim, RATE // 2)
        sim.client.fault("stall", seconds=1.0)      # a later gap of the same source
        time.sleep(1.5)
        last = drain(primary_client, sim, timeout_s=30)
        first = int(primary_client.xrange(keys.trades(sim.source), count=1)[0][1][b"id"])
        verdict = verify_primary(primary_client, sim, from_id=first, to_id=last)
        # Every trade exactly once but the one REST only has garbage for, which is never invented.
        assert verdict.missing == [poisoned], str(verdict)
        assert not (verdict.duplicated or verdict.unexpected or verdict.mismatched)
        assert primary_last_id(primary_client, sim.source) == last
        letters = [fields for _, fields in local(stack).xrange(keys.DEADLETTER)
                   if fields[b"reason"].startswith(b"REST row")]
        assert len(letters) == 1 and str(poisoned).encode() in letters[0][b"raw"]
        (event,) = [e for e in stack_events(stack, "gap_unfillable")
                    if e["fields"]["first_missing"] == poisoned]
        assert event["fields"]["last_missing"] == poisoned
    finally:
        remove_stack(stack)


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["binance", "coinbase", "kraken"])
def test_each_adapter_keeps_the_valid_rows_of_a_page_with_a_bad_one(mode):
    from btcfeed.exchanges.coinbase import CoinbaseAdapter
    from btcfeed.exchanges.kraken import KrakenAdapter, RequestPacer
    sim = Simulator(rate=500, mode=mode)
    try:
        wait_for(lambda: (lambda st: st["last_id"] >= st["first_id"] + 100)(sim.client.status()), 10,
                 "trades")
        sim.client.pause()
        status = sim.client.status()
        start, bad_id = status["first_id"] + 10, status["first_id"] + 20
        sim.client.fault("badrow", id=bad_id)
        rest = f"http://127.0.0.1:{sim.port}"
        adapter = {"binance": lambda: binance.BinanceAdapter("BTCUSDT", "ws://unused", rest),
                   "coinbase": lambda: CoinbaseAdapter("BTC-USD", "ws://unused", rest),
                   "kraken": lambda: KrakenAdapter("BTC/USD", "ws://unused/v2", rest)}[mode]()
        if mode == "kraken":
            adapter.pacer = RequestPacer(1000, 1000)           # the simulator sets no limit
        after_ts = sim.client.history(start - 1, start - 1)[0][3]
        page, exhausted = adapter.fetch_page(start, after_ts)
        assert [t.id for t in page] == [i for i in range(start, status["last_id"] + 1) if i != bad_id]
        assert exhausted and [row.id for row in page.rejected] == [bad_id]
        assert "NaN" in page.rejected[0].reason and str(bad_id).encode() in page.rejected[0].raw
    finally:
        sim.stop()
