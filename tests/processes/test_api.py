"""The read API (processes/api.py): in-process against a real redis-server standing in for the local
Redis, and as the supervised `api` of a real stack through a primary outage, its own SIGKILL and
client disconnects, compared id by id with the simulator's history."""

import http.client
import io
import json
import socket
import threading
import time

import pytest

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.events import recent_events
from btcfeed.lifecycle import EventLog
from btcfeed.processes import api as api_module
from btcfeed.storage.apply import expected_candles, compressed_batch
from btcfeed.storage.bus import read_heartbeats
from btcfeed.trade import Trade, encode_batch
from harness import (SOURCE, drain, local_client, primary_last_id, remove_stack, start_stack, verify_primary,
                     wait_for, writer_state)
from tools import verify
from tools.redis_process import free_port

RATE = 2000
SEED = 23


# --- a client of the API --------------------------------------------------------------------------

def get(port: int, path: str, headers=None, timeout: float = 10.0):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read()
        return response.status, response.getheader("Content-Type"), body
    finally:
        connection.close()


def get_json(port: int, path: str, headers=None):
    status, content_type, body = get(port, path, headers)
    assert content_type == "application/json", (path, status, body[:200])
    return status, json.loads(body)


class Follower(threading.Thread):
    """An SSE consumer that reconnects with Last-Event-ID whenever its connection ends, and keeps every
    event it receives (ids and data, in arrival order)."""

    def __init__(self, port: int, source: str, after_id: int):
        super().__init__(daemon=True)
        self.port, self.source, self.after_id = port, source, after_id
        self.events, self.connects, self.errors = [], 0, []
        self.last_id = None
        self.done = threading.Event()
        self.connection = self.sock = None

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self._follow_once()
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(type(exc).__name__)
            self.done.wait(0.2)

    def _follow_once(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.connection = connection
        path, headers = f"/v1/stream?source={self.source}", {}
        if self.last_id is None:
            path += f"&after_id={self.after_id}"
        else:
            headers["Last-Event-ID"] = str(self.last_id)
        connection.request("GET", path, headers=headers)
        # getresponse() lets go of the socket (the answer ends with the connection): keep it
        self.sock = connection.sock
        response = connection.getresponse()
        if response.status != 200:
            self.errors.append(f"status {response.status}: {response.read()[:200]!r}")
            return
        self.connects += 1
        event_id = data = None
        while not self.done.is_set():
            line = response.fp.readline()
            if not line:
                return
            line = line.rstrip(b"\n")
            if line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
            elif line.startswith(b"event: error"):
                self.errors.append("event: error")
            elif not line and data is not None:
                assert data["id"] == event_id
                self.events.append(data)
                self.last_id = event_id
                event_id = data = None

    def disconnect(self) -> None:
        """The client drops its connection (it reconnects by itself)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.done.set()
        self.disconnect()
        self.join(10)


def assert_exactly_the_history(events, sim, first_id: int, last_id: int) -> None:
    ids = [event["id"] for event in events]
    assert ids == list(range(first_id, last_id + 1)), (
        f"{len(ids)} events, first {ids[:3]}, last {ids[-3:]}, "
        f"out of order or repeated at {[b for a, b in zip(ids, ids[1:]) if b != a + 1][:5]}")
    expected = verify.exchange_trades(sim.client, first_id, last_id)
    for event, trade in zip(events, expected):
        assert (event["p"], event["q"], event["side"], event["ts"]) == (trade.p, trade.q, trade.side,
                                                                        trade.ts), event
        assert isinstance(event["p"], str) and isinstance(event["id"], int) and event["rts"] > 0


# --- in process, against a real redis-server ------------------------------------------------------

def trade(trade_id: int) -> Trade:
    return Trade(trade_id, f"{60000 + trade_id % 89}.{trade_id % 100:02d}", "0.01000000",
                 "buy" if trade_id % 3 else "sell",
                 1_700_000_000_000 + trade_id * 50, 1_700_000_000_005 + trade_id * 50)


@pytest.fixture
def served(redis_server, tmp_path):
    """An Api in this process over a local Redis whose mirror holds trades 1..5000 (one a batch
    of 100), with its view built."""
    client = redis_server.client()
    for first in range(1, 5001, 100):
        batch = encode_batch([trade(i) for i in range(first, first + 100)])
        client.xadd(keys.mirror(SOURCE), compressed_batch(batch))
    started = []

    def start(**env):
        cfg = config_module.load({"BTCFEED_LOCAL_URL": redis_server.url, "BTCFEED_STATE_DIR": str(tmp_path),
                                  "BTCFEED_SOURCES": SOURCE, "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}",
                                  **env})
        api = api_module.Api(cfg, EventLog("api", stream=io.StringIO(), capture=False))
        api.validate()
        api.initialize()
        started.append(api)
        wait_for(lambda: (api.builders.get(SOURCE) and api.builders[SOURCE].next == 5001), 10, "the view")
        return api, api.server.server_address[1]

    yield start, client
    for api in started:
        api.stopping.set()
        api.shutdown()
    client.close()


def test_trades_are_served_in_pages_by_trade_id(served):
    start, _ = served
    _, port = start()
    got, after = [], None
    while True:
        position = f"&after_id={after}" if after else ""
        status, page = get_json(port, f"/v1/trades?source={SOURCE}&limit=777{position}")
        assert status == 200 and page["newest_id"] == 5000
        if not page["trades"]:
            break
        got.extend(page["trades"])
        after = page["trades"][-1]["id"]
    assert [t["id"] for t in got] == list(range(1, 5001))
    t = trade(42)
    assert got[41] == {"id": 42, "p": t.p, "q": "0.01000000", "side": t.side, "ts": t.ts, "rts": t.rts}
    status, page = get_json(port, f"/v1/trades?source={SOURCE}&after_id=4990")
    assert [t["id"] for t in page["trades"]] == list(range(4991, 5001))
    status, last = get_json(port, f"/v1/last?source={SOURCE}")
    assert status == 200 and last["trade"]["id"] == 5000 and last["trade"]["p"] == trade(5000).p
    status, sources = get_json(port, "/v1/sources")
    assert sources["sources"][0]["newest_id"] == 5000 and sources["sources"][0]["oldest_id"] == 1
    assert sources["writer_state"] == "primary"


def test_candles_are_computed_from_the_view(served):
    start, _ = served
    _, port = start()
    low, high = trade(700).ts, trade(4200).ts
    status, document = get_json(port, f"/v1/candles?source={SOURCE}&from={low}&to={high}")
    assert status == 200
    wanted = expected_candles([trade(i) for i in range(1, 5001) if low <= trade(i).ts < high])
    assert len(document["candles"]) == len(wanted) >= 3
    for candle in document["candles"]:
        w = wanted[candle["t"]]
        assert candle == {name: w[name] for name in ("t", "o", "h", "l", "c", "v", "n", "fid", "lid")}


def test_the_price_is_served_when_there_is_one(served):
    start, client = served
    _, port = start()
    status, document = get_json(port, "/v1/price")
    assert status == 404 and document == {"error": "no price yet"}
    client.hset(keys.PRICE, mapping={"source": SOURCE, "quote": "USDT", "p": "61234.50", "q": "0.1", "id": 9,
                                     "ts": 1700000000000, "rts": 1700000000001, "since": 1690000000000})
    status, document = get_json(port, "/v1/price")
    assert status == 200
    assert (document["p"], document["id"], document["source"]) == ("61234.50", 9, SOURCE)


@pytest.mark.parametrize("path, code, words", [
    ("/v1/trades", 400, "source parameter is required"),
    ("/v1/trades?source=kraken:XBT/EUR", 404, "unknown source"),
    (f"/v1/trades?source={SOURCE}&after_id=12x", 400, "after_id must be a trade id"),
    (f"/v1/trades?source={SOURCE}&after_id=-5", 400, "after_id must be a trade id"),
    (f"/v1/trades?source={SOURCE}&after_id=99999999999999999999", 400, "after_id must be a trade id"),
    (f"/v1/trades?source={SOURCE}&limit=10001", 400, "limit must be between 1 and 10000"),
    (f"/v1/trades?source={SOURCE}&limit=0", 400, "limit must be between 1 and 10000"),
    (f"/v1/candles?source={SOURCE}&from=5", 400, "from and to"),
    (f"/v1/candles?source={SOURCE}&from=5&to=5", 400, "from must be below to"),
    (f"/v1/stream?source={SOURCE}&after_id=abc", 400, "after_id must be a trade id"),
    ("/v1/last?source=nope", 404, "unknown source"),
    ("/v2/everything", 404, "not found"),
])
def test_bad_requests_get_a_clear_4xx_and_nothing_else(served, path, code, words):
    start, _ = served
    _, port = start()
    status, document = get_json(port, path)
    assert status == code and words in document["error"] and "\n" not in document["error"]
    assert "Traceback" not in json.dumps(document)


def test_a_malformed_last_event_id_and_a_trimmed_position_are_refused(served):
    start, client = served
    _, port = start()
    status, document = get_json(port, f"/v1/stream?source={SOURCE}", {"Last-Event-ID": "1e9"})
    assert status == 400 and "Last-Event-ID" in document["error"]
    client.xtrim(keys.view(SOURCE), minid="1001-0", approximate=False)
    status, document = get_json(port, f"/v1/trades?source={SOURCE}&after_id=10")
    assert status == 410 and document["oldest_id"] == 1001
    status, document = get_json(port, f"/v1/stream?source={SOURCE}&after_id=10")
    assert status == 410 and document["oldest_id"] == 1001


def test_a_token_is_required_when_one_is_set_and_beyond_loopback(served):
    start, _ = served
    _, port = start(BTCFEED_API_TOKEN="s3cret-token-of-the-api")
    status, document = get_json(port, "/v1/sources")
    assert status == 401 and document == {"error": "a bearer token is required"}
    status, _ = get_json(port, "/v1/sources", {"Authorization": "Bearer wrong"})
    assert status == 401
    status, document = get_json(port, "/v1/sources", {"Authorization": "Bearer s3cret-token-of-the-api"})
    assert status == 200 and document["sources"][0]["source"] == SOURCE
    cfg = config_module.load({"BTCFEED_SOURCES": SOURCE, "BTCFEED_API_ADDR": "0.0.0.0:8078"})
    with pytest.raises(config_module.ConfigError, match="BTCFEED_API_TOKEN"):
        api_module.Api(cfg, EventLog("api", stream=io.StringIO(), capture=False)).validate()


def test_a_stream_resumes_after_its_last_event_id_and_goes_live(served):
    start, client = served
    _, port = start()
    follower = Follower(port, SOURCE, after_id=4000)
    follower.start()
    try:
        wait_for(lambda: follower.last_id == 5000, 10, "the catch-up")
        follower.disconnect()
        wait_for(lambda: follower.connects == 2, 10, f"the reconnect ({follower.errors})")
        newest = encode_batch([trade(i) for i in range(5001, 5201)])
        client.xadd(keys.mirror(SOURCE), compressed_batch(newest))
        wait_for(lambda: follower.last_id == 5200, 10, "the live trades")
    finally:
        follower.stop()
    assert [e["id"] for e in follower.events] == list(range(4001, 5201))
    t = trade(5200)
    assert follower.events[-1] == {"id": 5200, "p": t.p, "q": "0.01000000", "side": t.side, "ts": t.ts,
                                   "rts": t.rts}


def test_streams_beyond_the_cap_get_503(served, monkeypatch):
    monkeypatch.setattr(api_module, "MAX_STREAMS", 2)
    start, _ = served
    api, port = start()
    followers = [Follower(port, SOURCE, after_id=4990) for _ in range(2)]
    for follower in followers:
        follower.start()
    try:
        wait_for(lambda: api.counts["streams_open"] == 2, 10, "two streams")
        status, document = get_json(port, f"/v1/stream?source={SOURCE}")
        assert status == 503 and "too many streams" in document["error"]
    finally:
        for follower in followers:
            follower.stop()
    wait_for(lambda: api.counts["streams_open"] == 0, 10, "the streams to close")
    assert api.counts["streams_refused"] == 1


# --- the supervised api in a real stack -------------------------------------------------------------

@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


def api_port(stack) -> int:
    return int(stack.env["BTCFEED_API_ADDR"].rpartition(":")[2])


def view_field(port: int, name: str):
    """A field of the first source in /v1/sources; None while the api is not listening yet."""
    try:
        status, document = get_json(port, "/v1/sources")
    except OSError:
        return None
    return document["sources"][0][name] if status == 200 else None


def view_newest(port: int):
    return view_field(port, "newest_id")


@pytest.mark.integration
def test_a_stream_follows_every_trade_across_an_outage_a_kill_and_a_disconnect(primary, sim, stack):
    port = api_port(stack)
    first = wait_for(lambda: view_field(port, "oldest_id"), 20, "the view's first trade")
    follower = Follower(port, SOURCE, after_id=first - 1)
    follower.start()
    try:
        wait_for(lambda: len(follower.events) > RATE, 20, "the stream")
        follower.disconnect()                                    # the client drops and comes back
        wait_for(lambda: follower.connects >= 2 and len(follower.events) > 2 * RATE, 20,
                 "the stream after a reconnect")
        primary.kill()                                           # the primary goes away
        wait_for(lambda: writer_state(stack) == "failover", 10, "the writer to fail over")
        during = len(follower.events)
        wait_for(lambda: len(follower.events) > during + RATE, 20, "trades while the primary is down")
        stack.kill("api")                                        # and the api itself is SIGKILLed
        connects = follower.connects
        wait_for(lambda: follower.connects > connects and len(follower.events) > during + 3 * RATE, 30,
                 "the stream from the restarted api")
        primary.start()
        wait_for(lambda: writer_state(stack) == "primary", 60, "the hand-back to the primary")
        after_back = len(follower.events)
        wait_for(lambda: len(follower.events) > after_back + RATE, 20, "trades after the hand-back")
        last_id = drain(primary.client(), sim)
        wait_for(lambda: follower.last_id == last_id, 30, f"the stream to reach trade {last_id}")
    finally:
        follower.stop()
    assert follower.connects >= 3, follower.errors
    assert_exactly_the_history(follower.events, sim, first, last_id)
    assert not [e for e in recent_events(local_client(stack), 500) if e["event"] == "view_ids_skipped"]
    assert verify_primary(primary.client(), sim, from_id=first).exact()


@pytest.mark.integration
def test_a_client_that_does_not_read_is_cut_without_slowing_the_feed(primary, sim, stack):
    port = api_port(stack)
    wait_for(lambda: (view_newest(port) or 0) > 0, 20, "the view")
    status, document = get_json(port, "/v1/sources")
    oldest = document["sources"][0]["oldest_id"]
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    slow.sendall(f"GET /v1/stream?source={SOURCE}&after_id={oldest - 1} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    started, before = time.monotonic(), primary_last_id(primary.client())
    follower = Follower(port, SOURCE, after_id=view_newest(port))       # a good client meanwhile
    follower.start()
    try:
        local = local_client(stack)
        wait_for(lambda: (read_heartbeats(local, ["api"])["api"] or {}).get("clients_cut", 0) >= 1,
                 api_module.SEND_DEADLINE_S + 10, "the slow client to be cut")
        elapsed = time.monotonic() - started
        landed = primary_last_id(primary.client()) - before
        assert landed >= 0.7 * RATE * elapsed, (landed, elapsed)     # the feed kept its pace
        assert len(follower.events) >= 0.7 * RATE * (elapsed - 1)      # and so did the other client
        cut = wait_for(lambda: [e for e in recent_events(local, 100) if e["event"] == "stream_client_cut"], 5,
                       "the event: " + open(stack.log_path("api")).read()[-3000:])
        assert "did not read" in cut[0]["fields"]["reason"]
        slow.settimeout(10)
        while slow.recv(65536):                                        # the server closed it
            pass
        status, sources = get_json(port, "/v1/sources")
        assert status == 200 and sources["sources"][0]["lag_ms"] < 2000
    finally:
        slow.close()
        follower.stop()
    ids = [e["id"] for e in follower.events]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
