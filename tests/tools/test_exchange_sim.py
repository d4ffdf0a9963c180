"""The exchange simulator as a real process: Binance stream and REST shapes, control API, injected faults."""

import base64
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal

import pytest
import websocket

from tools.simulator import (PACKAGE_ROOT, SimulatorClient, SimulatorError, start_simulator,
                                    stop_simulator)

pytestmark = pytest.mark.integration

DECIMAL_8 = re.compile(r"^[0-9]+\.[0-9]{8}$")
TRADE_KEYS = ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
REST_TRADE_KEYS = ["id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"]


class Sim:
    """A running simulator process and the ways to reach it."""

    def __init__(self, process, port):
        self.process = process
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"
        self.control = SimulatorClient(self.http)

    def connect(self, path="/ws/btcusdt@trade", timeout=5.0):
        return websocket.create_connection(self.ws + path, timeout=timeout)

    def get(self, path):
        """(status, headers, decoded JSON body) of a GET, whatever the status."""
        try:
            with urllib.request.urlopen(self.http + path, timeout=10) as response:
                return response.status, response.headers, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers, json.loads(exc.read())

    def wait_for(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.control.status()
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"simulator never reached the expected state: {self.control.status()}")


@pytest.fixture
def make_sim(tmp_path):
    """Start simulators with the given options; all are stopped after the test, their logs kept."""
    started = []

    def start(**options):
        options.setdefault("rate", 1000)
        options.setdefault("seed", 7)
        options.setdefault("log_path", str(tmp_path / f"sim{len(started)}.log"))
        sim = Sim(*start_simulator(**options))
        started.append(sim)
        return sim

    yield start
    for sim in started:
        stop_simulator(sim.process)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One simulator shared by the tests that do not change its global state."""
    log_path = tmp_path_factory.mktemp("shared-sim") / "sim.log"
    process, port = start_simulator(rate=1000, seed=7, log_path=str(log_path))
    yield Sim(process, port)
    stop_simulator(process)


class RawWebSocket:
    """A minimal client on a plain socket, to see frames exactly as the server sent them."""

    def __init__(self, port, path="/ws/btcusdt@trade", timeout=5.0, receive_buffer=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                          "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed by the server")
        self.buffer += data

    def complete_frame_length(self):
        """Length of the first buffered frame if it is complete, else None."""
        if len(self.buffer) < 2:
            return None
        length, header = self.buffer[1] & 0x7F, 2
        if length == 126:
            if len(self.buffer) < 4:
                return None
            length, header = struct.unpack("!H", self.buffer[2:4])[0], 4
        elif length == 127:
            if len(self.buffer) < 10:
                return None
            length, header = struct.unpack("!Q", self.buffer[2:10])[0], 10
        return header + length if len(self.buffer) >= header + length else None

    def read_frame(self):
        """(fin, opcode, payload) of the next frame; EOFError when the server closes first."""
        while self.complete_frame_length() is None:
            self._fill()
        total = self.complete_frame_length()
        frame, self.buffer = self.buffer[:total], self.buffer[total:]
        header = {126: 4, 127: 10}.get(frame[1] & 0x7F, 2)
        return bool(frame[0] & 0x80), frame[0] & 0x0F, frame[header:]

    def read_frames_until_closed(self, limit_seconds=5.0):
        """Every frame until the server closes the TCP connection."""
        frames, deadline = [], time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            try:
                frames.append(self.read_frame())
            except (EOFError, ConnectionResetError):
                return frames
        raise AssertionError("the server did not close the connection")

    def send_frame(self, opcode, payload=b"", fin=True):
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
        assert len(payload) < 126
        self.sock.sendall(bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + mask + masked)

    def close(self):
        self.sock.close()


def trade_id(message):
    data = json.loads(message)
    return data.get("data", data)["t"]


def receive_trades(ws, count):
    return [json.loads(ws.recv()) for _ in range(count)]


def assert_binance_trade(data):
    assert list(data) == TRADE_KEYS
    assert data["e"] == "trade" and data["s"] == "BTCUSDT" and data["M"] is True
    assert isinstance(data["m"], bool)
    assert type(data["t"]) is int and type(data["T"]) is int and type(data["E"]) is int
    assert DECIMAL_8.match(data["p"]) and DECIMAL_8.match(data["q"])
    assert Decimal(data["q"]) > 0
    assert 40_000 < Decimal(data["p"]) < 46_000
    assert data["T"] <= data["E"]
    assert abs(data["T"] - time.time() * 1000) < 10_000


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------

def test_raw_stream_sends_binance_trades_with_consecutive_ids(sim):
    ws = sim.connect("/ws/btcusdt@trade")
    try:
        trades = receive_trades(ws, 200)
    finally:
        ws.close()
    for data in trades:
        assert_binance_trade(data)
    ids = [data["t"] for data in trades]
    assert ids == list(range(ids[0], ids[0] + 200))


def test_combined_stream_wraps_each_trade_with_its_stream_name(sim):
    ws = sim.connect("/stream?streams=btcusdt@trade")
    try:
        messages = receive_trades(ws, 50)
    finally:
        ws.close()
    for message in messages:
        assert list(message) == ["stream", "data"]
        assert message["stream"] == "btcusdt@trade"
        assert_binance_trade(message["data"])
    ids = [message["data"]["t"] for message in messages]
    assert ids == list(range(ids[0], ids[0] + 50))


@pytest.mark.parametrize("path", ["/stream?streams=ethusdt@trade/btcusdt@trade",
                                  "/ws/ethusdt@trade/btcusdt@trade"])
def test_several_streams_deliver_only_the_known_one(sim, path):
    ws = sim.connect(path)
    try:
        messages = [json.loads(ws.recv()) for _ in range(20)]
    finally:
        ws.close()
    if path.startswith("/stream"):
        assert {message["stream"] for message in messages} == {"btcusdt@trade"}
        messages = [message["data"] for message in messages]
    assert {message["s"] for message in messages} == {"BTCUSDT"}


def test_unknown_stream_is_accepted_but_silent(sim):
    ws = sim.connect("/ws/ethusdt@trade", timeout=0.7)
    try:
        assert sim.control.status()["connections"] >= 1
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()
    finally:
        ws.close()


def test_subscribe_on_a_bare_connection_starts_the_stream(sim):
    ws = sim.connect("/ws")
    try:
        ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@trade"], "id": 7}))
        assert json.loads(ws.recv()) == {"result": None, "id": 7}
        assert_binance_trade(json.loads(ws.recv()))
        ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 8}))
        for _ in range(2000):                        # trades keep flowing around the reply
            reply = json.loads(ws.recv())
            if "id" in reply:
                break
        assert reply == {"result": ["btcusdt@trade"], "id": 8}
    finally:
        ws.close()


def test_client_ping_gets_pong_with_same_payload(sim):
    ws = sim.connect()
    try:
        ws.ping(b"are-you-there")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_PONG:
                break
        assert opcode == websocket.ABNF.OPCODE_PONG
        assert data == b"are-you-there"
    finally:
        ws.close()


def test_client_close_is_echoed_then_socket_closed(sim):
    raw = RawWebSocket(sim.port)
    try:
        raw.send_frame(0x8, struct.pack("!H", 1000) + b"bye")
        frames = raw.read_frames_until_closed()
    finally:
        raw.close()
    closes = [payload for fin, opcode, payload in frames if opcode == 0x8]
    assert closes and closes[0][:2] == struct.pack("!H", 1000)
    assert frames[-1][1] == 0x8, "nothing may follow the close frame"


def test_unmasked_client_frame_is_a_protocol_error(sim):
    raw = RawWebSocket(sim.port)
    try:
        raw.sock.sendall(bytes((0x89, 2)) + b"hi")     # ping without a mask
        frames = raw.read_frames_until_closed()
    finally:
        raw.close()
    assert frames[-1][1] == 0x8 and frames[-1][2][:2] == struct.pack("!H", 1002)


# ---------------------------------------------------------------------------------------------
# Determinism, history and REST
# ---------------------------------------------------------------------------------------------

def test_same_seed_gives_same_trades_and_other_seed_does_not(make_sim):
    first, second = make_sim(seed=11, start_id=5000), make_sim(seed=11, start_id=5000)
    other = make_sim(seed=12, start_id=5000)
    for each in (first, second, other):
        each.wait_for(lambda status: status["last_id"] >= 5299)

    def sequence(each):
        return [(price, qty, side) for _, price, qty, _, side in each.control.history(5000, 5299)]

    assert [row[0] for row in first.control.history(5000, 5299)] == list(range(5000, 5300))
    assert sequence(first) == sequence(second)
    assert sequence(first) != sequence(other)


def test_history_endpoint_equals_what_the_socket_sent(sim):
    ws = sim.connect()
    try:
        trades = receive_trades(ws, 300)
    finally:
        ws.close()
    rows = sim.control.history(trades[0]["t"], trades[-1]["t"])
    assert rows == [[data["t"], data["p"], data["q"], data["T"], data["m"]] for data in trades]


def test_historical_trades_pages_follow_each_other(sim):
    status = sim.wait_for(lambda status: status["last_id"] - status["first_id"] >= 600)
    start = status["first_id"] + 10
    code, headers, page = sim.get(f"/api/v3/historicalTrades?symbol=BTCUSDT&limit=100&fromId={start}")
    assert code == 200
    code, _, next_page = sim.get(f"/api/v3/historicalTrades?symbol=BTCUSDT&limit=100&fromId={start + 100}")
    ids = [trade["id"] for trade in page + next_page]
    assert ids == list(range(start, start + 200))
    history = sim.control.history(start, start + 99)
    for trade, row in zip(page, history):
        assert list(trade) == REST_TRADE_KEYS
        assert [trade["id"], trade["price"], trade["qty"], trade["time"], trade["isBuyerMaker"]] == row
        assert trade["isBestMatch"] is True
        assert Decimal(trade["quoteQty"]) == Decimal(trade["price"]) * Decimal(trade["qty"])
        assert DECIMAL_8.match(trade["quoteQty"])


def test_historical_trades_limits_and_latest(sim):
    sim.wait_for(lambda status: status["last_id"] - status["first_id"] >= 1100)
    before = sim.control.status()["last_id"]
    code, _, latest = sim.get("/api/v3/historicalTrades?symbol=BTCUSDT")
    assert code == 200 and len(latest) == 500
    assert latest[-1]["id"] >= before
    assert [trade["id"] for trade in latest] == list(range(latest[0]["id"], latest[0]["id"] + 500))
    code, _, most = sim.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=1000")
    assert code == 200 and len(most) == 1000
    code, _, beyond = sim.get(f"/api/v3/historicalTrades?symbol=BTCUSDT&fromId={before + 10 ** 6}")
    assert code == 200 and beyond == []


@pytest.mark.parametrize("query, code, error_code", [
    ("symbol=BTCUSDT&limit=1001", 400, -1100),
    ("symbol=BTCUSDT&limit=0", 400, -1100),
    ("symbol=BTCUSDT&fromId=abc", 400, -1100),
    ("symbol=ETHUSDT", 400, -1121),
    ("limit=10", 400, -1102),
])
def test_historical_trades_errors_are_binance_errors(sim, query, code, error_code):
    status, _, body = sim.get(f"/api/v3/historicalTrades?{query}")
    assert status == code
    assert body["code"] == error_code and isinstance(body["msg"], str)
    if error_code == -1121:
        assert body["msg"] == "Invalid symbol."


def test_from_id_older_than_history_starts_at_oldest_retained(make_sim):
    small = make_sim(rate=2000, history_max=500, start_id=100)
    small.wait_for(lambda status: status["first_id"] > 100)
    small.control.pause()
    oldest = small.control.status()["first_id"]
    code, _, trades = small.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=50&fromId=100")
    assert code == 200
    assert [trade["id"] for trade in trades] == list(range(oldest, oldest + 50))
    assert small.control.history(0, oldest - 1) == []


def test_recent_trades_ping_time_and_weight_header(sim):
    before = sim.control.status()["last_id"]
    code, headers, trades = sim.get("/api/v3/trades?symbol=BTCUSDT&limit=5")
    assert code == 200 and len(trades) == 5
    assert list(trades[0]) == REST_TRADE_KEYS and trades[-1]["id"] >= before
    weight = int(headers["X-MBX-USED-WEIGHT-1M"])
    _, headers, _ = sim.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=1")
    after = int(headers["X-MBX-USED-WEIGHT-1M"])
    assert after - weight == 25 or after == 25          # or a new minute began in between
    assert sim.get("/api/v3/ping")[:3:2] == (200, {})
    code, _, body = sim.get("/api/v3/time")
    assert code == 200 and abs(body["serverTime"] - time.time() * 1000) < 5000


# ---------------------------------------------------------------------------------------------
# Control API
# ---------------------------------------------------------------------------------------------

def test_pause_stops_trades_and_resume_continues_with_next_id(make_sim):
    each = make_sim()
    each.wait_for(lambda status: status["last_id"] >= 1_000_100)
    each.control.pause()
    paused = each.control.status()
    ws = each.connect(timeout=0.5)
    try:
        with pytest.raises(websocket.WebSocketTimeoutException):
            ws.recv()
        assert paused["paused"] is True
        assert each.control.status()["last_id"] == paused["last_id"]
        each.control.resume()
        ws.settimeout(5)
        assert trade_id(ws.recv()) == paused["last_id"] + 1
        assert each.control.status()["paused"] is False
    finally:
        ws.close()


def test_rate_change_and_fractional_rate(make_sim):
    each = make_sim(rate=1000)
    each.control.set_rate(2.5)
    start = each.control.status()
    time.sleep(1.25)
    end = each.control.status()
    assert end["rate"] == 2.5
    assert 2 <= end["generated"] - start["generated"] <= 4
    each.control.set_rate(400)
    start = each.control.status()
    time.sleep(0.5)
    assert 120 <= each.control.status()["generated"] - start["generated"] <= 280


def test_paused_flag_status_shape_and_control_errors(make_sim):
    each = make_sim(paused=True, start_id=42)
    time.sleep(0.2)
    assert each.control.status() == {"last_id": 41, "first_id": 42, "rate": 1000, "paused": True,
                                     "connections": 0, "generated": 0}
    with pytest.raises(SimulatorError, match="400"):
        each.control.fault("bogus")
    with pytest.raises(SimulatorError, match="400"):
        each.control.set_rate(0)
    assert each.get("/_sim/pause")[0] == 405
    assert each.get("/api/v3/nothing")[0] == 404


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------

def test_drop_closes_every_connection_without_close_frame(make_sim):
    each = make_sim()
    ws, raw = each.connect(), RawWebSocket(each.port)
    try:
        ws.recv()
        raw.read_frame()
        each.control.fault("drop")
        with pytest.raises(websocket.WebSocketConnectionClosedException):
            for _ in range(100_000):
                ws.recv()
        frames = raw.read_frames_until_closed()
        assert raw.buffer == b"", "a drop closes between frames"
        assert all(opcode == 0x1 for _, opcode, _ in frames), "no close frame on a drop"
        assert each.wait_for(lambda status: status["connections"] == 0)
    finally:
        ws.close()
        raw.close()


def test_cut_leaves_a_truncated_frame_then_closes(make_sim):
    each = make_sim()
    ws, raw = each.connect(), RawWebSocket(each.port)
    try:
        raw.read_frame()
        ws.recv()
        each.control.fault("cut")
        frames = raw.read_frames_until_closed()
        assert raw.buffer, "the connection must end inside a frame"
        assert raw.complete_frame_length() is None
        assert raw.buffer[0] == 0x81, "the truncated bytes are the start of a text frame"
        assert all(opcode == 0x1 for _, opcode, _ in frames)
        with pytest.raises(websocket.WebSocketException):
            for _ in range(100_000):
                ws.recv()
    finally:
        ws.close()
        raw.close()


# Timing-sensitive (a 1 s silence measured on the client): it failed once in a loaded CI run with no
# silence at all, not yet explained, so it runs in `make soak`; the stall fault itself is also
# exercised in the default run through the stack (tests/test_pipeline.py, the stall case).
@pytest.mark.slow
def test_stall_sends_nothing_then_resumes_after_a_gap(make_sim):
    each = make_sim(rate=1000)
    ws = each.connect()
    try:
        receive_trades(ws, 10)
        asked = time.monotonic()
        each.control.fault("stall", seconds=1.0)
        answered = time.monotonic()
        arrivals = []
        deadline = answered + 2.5
        while time.monotonic() < deadline:
            received = trade_id(ws.recv())
            arrivals.append((time.monotonic(), received))
        # The stall is where the ids jump; the fault call's own latency (the stall starts somewhere
        # between asking and the answer) must not count, so the resumption is timed from both ends.
        jump, before, after, resumed = max((later[1] - earlier[1], earlier[1], later[1], later[0])
                                           for earlier, later in zip(arrivals, arrivals[1:]))
        assert after - before > 500, "trades generated during the stall are never sent"
        assert resumed - asked >= 0.8 and resumed - answered <= 1.6
        skipped = each.control.history(before + 1, after - 1)
        assert [row[0] for row in skipped] == list(range(before + 1, after)), "the gap can be backfilled"
        later_ids = [trade for _, trade in arrivals if trade >= after]
        assert later_ids == list(range(after, after + len(later_ids)))
    finally:
        ws.close()


def test_fragment_sends_continuation_frames_that_reassemble(make_sim):
    each = make_sim()
    ws, raw = each.connect(), RawWebSocket(each.port)
    try:
        each.control.fault("fragment", on=True)
        fin, opcode, payload = raw.read_frame()
        deadline = time.monotonic() + 5
        while fin and time.monotonic() < deadline:   # skip whole frames sent before the switch
            fin, opcode, payload = raw.read_frame()
        assert not fin and opcode == 0x1, "a message must start with a text frame with FIN=0"
        pieces = [payload]
        while not fin:
            fin, opcode, payload = raw.read_frame()
            assert opcode == 0x0
            pieces.append(payload)
        assert len(pieces) >= 2
        assert_binance_trade(json.loads(b"".join(pieces)))

        ids = [trade_id(ws.recv()) for _ in range(300)]
        assert ids == list(range(ids[0], ids[0] + 300))
        each.control.fault("fragment", on=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            fin, opcode, _ = raw.read_frame()
            if fin and opcode == 0x1:
                break
        assert fin and opcode == 0x1
    finally:
        ws.close()
        raw.close()


def test_rest429_refuses_the_next_market_data_requests(sim):
    sim.control.fault("rest429", count=2)
    assert sim.get("/api/v3/ping")[0] == 200, "only market data requests are refused"
    for _ in range(2):
        code, headers, body = sim.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=5")
        assert code == 429
        assert headers["Retry-After"] == "1"
        assert body["code"] == -1003 and body["msg"].startswith("Too many requests")
    code, _, trades = sim.get("/api/v3/historicalTrades?symbol=BTCUSDT&limit=5")
    assert code == 200 and len(trades) == 5


def test_slow_client_is_dropped_when_its_buffer_overflows(make_sim):
    each = make_sim(rate=50_000, max_send_buffer=256 * 1024)
    raw = RawWebSocket(each.port, receive_buffer=4096)     # and never read
    try:
        each.wait_for(lambda status: status["connections"] == 1)
        each.wait_for(lambda status: status["connections"] == 0, timeout=15)
    finally:
        raw.close()


# ---------------------------------------------------------------------------------------------
# Connection lifetime
# ---------------------------------------------------------------------------------------------

def test_server_pings_are_answered_and_silent_clients_are_closed(make_sim):
    each = make_sim(ping_interval=0.3, pong_timeout=1.0)
    silent = RawWebSocket(each.port)                     # reads nothing, so never answers pings
    ws = each.connect()
    try:
        pings, deadline = 0, time.monotonic() + 2.5
        while time.monotonic() < deadline:
            opcode, _ = ws.recv_data(control_frame=True)
            pings += opcode == websocket.ABNF.OPCODE_PING
        assert pings >= 4
        assert_binance_trade(json.loads(ws.recv()))        # still alive after 2.5 pong timeouts
        frames = silent.read_frames_until_closed()
        closes = [payload for _, opcode, payload in frames if opcode == 0x8]
        assert closes and closes[0][:2] == struct.pack("!H", 1008)
    finally:
        ws.close()
        silent.close()


def test_connection_older_than_max_is_closed_with_close_frame(make_sim):
    each = make_sim(max_conn_seconds=1.0)
    ws = each.connect()
    try:
        opened, opcode = time.monotonic(), None
        while opcode != websocket.ABNF.OPCODE_CLOSE and time.monotonic() - opened < 5:
            opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert data[:2] == struct.pack("!H", 1001)
        assert 0.9 <= time.monotonic() - opened <= 2.5
    finally:
        ws.close()


def test_sigterm_exits_zero_and_says_goodbye(make_sim):
    each = make_sim()
    ws = each.connect()
    ws.recv()
    each.process.send_signal(signal.SIGTERM)
    assert each.process.wait(10) == 0
    opcode = None
    try:
        while opcode != websocket.ABNF.OPCODE_CLOSE:
            opcode, data = ws.recv_data(control_frame=True)
    finally:
        ws.close()
    assert data[:2] == struct.pack("!H", 1001)


@pytest.mark.parametrize("args", [["--rate", "abc"], ["--rate", "0"], ["--no-such-flag"]])
def test_bad_command_line_is_one_readable_error_and_exit_2(args):
    result = subprocess.run([sys.executable, "-m", "tools.simulator", *args], cwd=PACKAGE_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "error:" in result.stderr.strip().splitlines()[-1]


# --- Coinbase Exchange and Kraken v2 modes ---------------------------------------------------------

def subscribed(sim, mode):
    """A websocket client subscribed to the mode's trade channel, and the replies to that."""
    from btcfeed.exchanges import coinbase, kraken
    path, message = {"coinbase": ("/", coinbase.subscribe_message("BTC-USD")),
                     "kraken": ("/v2", kraken.subscribe_message("BTC/USD"))}[mode]
    ws = sim.connect(path)
    ws.send(message.decode())
    return ws


def read_until(ws, predicate, seconds=5.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        message = json.loads(ws.recv())
        if predicate(message):
            return message
    raise AssertionError("expected message never came")


def test_coinbase_mode_feed_shapes_heartbeats_and_history(make_sim):
    sim = make_sim(mode="coinbase", rate=200)
    # last_match names the newest trade: subscribe once there is one (a fresh simulator has none).
    deadline = time.monotonic() + 5
    while sim.control.status()["generated"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    ws = subscribed(sim, "coinbase")
    try:
        reply = json.loads(ws.recv())
        assert reply["type"] == "subscriptions"
        assert {c["name"] for c in reply["channels"]} == {"matches", "heartbeat"}
        first = read_until(ws, lambda m: m["type"] in ("last_match", "match"))
        assert first["type"] == "last_match" and first["product_id"] == "BTC-USD"
        match = read_until(ws, lambda m: m["type"] == "match")
        assert match["trade_id"] > first["trade_id"] and match["side"] in ("buy", "sell")
        assert re.fullmatch(r"[0-9]+\.[0-9]{2}", match["price"]) and DECIMAL_8.match(match["size"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", match["time"])
        beat = read_until(ws, lambda m: m["type"] == "heartbeat")
        assert beat["last_trade_id"] >= match["trade_id"] and beat["product_id"] == "BTC-USD"
        (row,) = sim.control.history(match["trade_id"], match["trade_id"])
        # The history row says isBuyerMaker; Coinbase's side is the maker's side.
        assert row[:3] == [match["trade_id"], match["price"], match["size"]]
        assert row[4] == (match["side"] == "buy")
    finally:
        ws.close()
    status = sim.control.status()
    assert (status["mode"], status["symbol"]) == ("coinbase", "BTC-USD")


def test_coinbase_mode_rest_pages_cursors_and_429(make_sim):
    sim = make_sim(mode="coinbase", rate=2000)
    sim.wait_for(lambda s: s["last_id"] >= s["first_id"] + 50)
    sim.control.pause()
    last = sim.control.status()["last_id"]
    code, headers, body = sim.get("/products/BTC-USD/trades?limit=3")
    assert code == 200 and [row["trade_id"] for row in body] == [last, last - 1, last - 2]
    assert set(body[0]) == {"time", "trade_id", "price", "size", "side"}
    assert (headers["CB-BEFORE"], headers["CB-AFTER"]) == (str(last), str(last - 2))
    code, _, body = sim.get(f"/products/BTC-USD/trades?after={last - 2}&limit=2")
    assert [row["trade_id"] for row in body] == [last - 3, last - 4]
    assert sim.get("/products/ETH-USD/trades")[0] == 404
    assert sim.get("/products/BTC-USD/trades?limit=1001")[0] == 400
    sim.control.fault("rest429", count=1)
    assert sim.get("/products/BTC-USD/trades")[:1] == (429,)
    assert sim.get("/products/BTC-USD/trades")[0] == 200


def test_kraken_mode_feed_shapes_numbers_and_errors(make_sim):
    sim = make_sim(mode="kraken", rate=500)
    ws = subscribed(sim, "kraken")
    try:
        assert json.loads(ws.recv())["channel"] == "status"
        ack = json.loads(ws.recv())
        assert ack["method"] == "subscribe" and ack["success"] is True
        raw = None
        for _ in range(200):
            raw = ws.recv()
            if '"channel":"trade"' in raw:
                break
        message = json.loads(raw, parse_float=Decimal)
        trade = message["data"][0]
        assert message["type"] == "update" and trade["symbol"] == "BTC/USD"
        assert isinstance(trade["price"], (Decimal, int)) and isinstance(trade["qty"], (Decimal, int))
        read_until(ws, lambda m: m.get("channel") == "heartbeat")
        (row,) = sim.control.history(trade["trade_id"], trade["trade_id"])
        assert Decimal(row[1]) == trade["price"] and Decimal(row[2]) == trade["qty"]
        assert row[4] == (trade["side"] == "sell")       # Kraken's side is the taker's
        ws.send(json.dumps({"method": "subscribe", "params": {"channel": "trade", "symbol": ["BTC/EUR"]}}))
        error = read_until(ws, lambda m: m.get("success") is False)
        assert "BTC/EUR" in error["error"]
    finally:
        ws.close()


def test_kraken_mode_rest_since_last_and_rate_limit_error(make_sim):
    sim = make_sim(mode="kraken", rate=2000)
    sim.wait_for(lambda s: s["last_id"] >= s["first_id"] + 50)
    sim.control.pause()
    status = sim.control.status()
    code, _, body = sim.get("/0/public/Trades?pair=XBTUSD&count=5")
    rows = body["result"]["XXBTZUSD"]
    assert code == 200 and body["error"] == [] and [r[6] for r in rows] == list(range(status["last_id"] - 4,
                                                                                   status["last_id"] + 1))
    assert len(rows[0]) == 7 and rows[0][3] in ("b", "s")
    since = body["result"]["last"]
    code, _, body = sim.get(f"/0/public/Trades?pair=XBTUSD&since={since}")
    assert body["result"]["XXBTZUSD"] == []       # nothing after the newest trade's time
    sim.control.fault("rest429", count=1)
    assert sim.get("/0/public/Trades?pair=XBTUSD")[2] == {"error": ["EGeneral:Too many requests"]}
    assert sim.get("/0/public/Trades?pair=ETHUSD")[2]["error"] == ["EQuery:Unknown asset pair"]


@pytest.mark.parametrize("mode, symbol", [("coinbase", "BTCUSD"), ("kraken", "BTC-USD"),
                                          ("binance", "BTC/USD")])
def test_mode_rejects_another_exchanges_symbol(mode, symbol):
    result = subprocess.run([sys.executable, "-m", "tools.simulator", "--mode", mode, "--symbol", symbol],
                            cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--symbol must be" in result.stderr
