"""bin/monitor: the frame drawn from a status document, and the real command in a pseudo-terminal."""

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btcfeed import config as config_module
from btcfeed.commands import monitor
from btcfeed.commands.healthcheck import status_url
from btcfeed.commands.monitor import failover_timeline, render_text, sparkline
from tools.redis_process import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "bin", "monitor")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "status-sample.json")
SECTION_FAILED = "cannot be drawn"


@pytest.fixture
def sample():
    with open(FIXTURE) as handle:
        return json.load(handle)


def lines_of(text: str):
    return text.rstrip("\n").split("\n")


# --- the frame ------------------------------------------------------------------------------------

def test_sample_fits_80x24_and_shows_the_key_facts(sample):
    text = render_text(sample, width=80, height=24)
    lines = lines_of(text)
    assert len(lines) <= 24
    assert max(len(line) for line in lines) <= 80
    assert "\x1b" not in text
    for fact in ("97312.45", "draining", "binance:BTCUSDT", "coinbase:BTC-USD", "1640/4120", "40%",
                 "redis-local", "ingest", "writer", "sync", "health", "listener", "DEGRADED",
                 "via health API", "212.4MB", "unix:///srv/btcfeed/var/redis.sock"):
        assert fact in text, fact
    # The newest event is the last line, and the screen is full (events take what is left).
    assert "drain_start" in lines[-1] and "backlog=4120" in lines[-1]
    assert len(lines) == 24
    assert SECTION_FAILED not in text


def test_sample_shows_human_ages_and_writer_duration(sample):
    text = render_text(sample)
    assert "310ms" in text and "42s" in text
    assert "draining for 18s" in text
    assert "1h00m" in text  # uptime 3605 s
    assert "ETA 2s" in text and "58,800/s" in text


@pytest.mark.parametrize("width,height", [(40, 12), (60, 18), (80, 10), (120, 40), (30, 6)])
def test_other_terminal_sizes_fit(sample, width, height):
    lines = lines_of(render_text(sample, width=width, height=height))
    assert len(lines) <= height
    assert max(len(line) for line in lines) <= width
    # The most important facts survive a small screen.
    assert "DEGRADED" in lines[0]
    assert any("draining" in line for line in lines)


def test_narrow_table_drops_whole_columns_instead_of_cutting_all(sample):
    text = render_text(sample, width=50, height=40)
    assert "binance:BTCUSDT" in text  # the source name is never the column that goes
    assert "reconn" not in text       # the least useful column went first
    assert "conn" in text and "age" in text


def test_short_terminal_keeps_header_writer_and_price(sample):
    lines = lines_of(render_text(sample, width=80, height=5))
    assert len(lines) <= 5
    text = "\n".join(lines)
    assert "DEGRADED" in text and "draining for 18s" in text and "97312.45" in text


def test_events_fill_a_tall_terminal(sample):
    sample["events"] = sample["events"] * 10
    lines = lines_of(render_text(sample, width=80, height=50))
    assert len(lines) == 50


def test_document_with_everything_missing_renders():
    text = render_text({}, width=80, height=24)
    assert "btcfeed" in text and "-" in text
    assert SECTION_FAILED not in text


def test_document_with_every_field_null_renders(sample):
    def nulled(value):
        if isinstance(value, dict):
            return {key: nulled(item) for key, item in value.items()}
        if isinstance(value, list):
            return [nulled(item) for item in value]
        return None
    text = render_text(nulled(sample), width=80, height=24)
    assert "97312.45" not in text
    assert "redis-local" in text  # the names (keys) are still there, their figures show "-"
    assert SECTION_FAILED not in text


ODD_VALUES = st.sampled_from([None, "", "x", -1, 0, 1e308, float("nan"), True, [], {}, [1, "a"], {"a": 1}])


def mutated(value, data, depth=0):
    """The document with some of its values (at any depth) replaced by values of the wrong kind."""
    if depth > 0 and data.draw(st.integers(0, 5)) == 0:
        return data.draw(ODD_VALUES)
    if isinstance(value, dict):
        return {key: mutated(item, data, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [mutated(item, data, depth + 1) for item in value]
    return value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_odd_values_anywhere_never_break_a_section(data):
    with open(FIXTURE) as handle:
        document = mutated(json.load(handle), data)
    text = render_text(document, width=80, height=24)
    assert SECTION_FAILED not in text
    assert len(lines_of(text)) <= 24


def test_critical_document_says_critical(sample):
    sample["health"] = {"status": "critical", "reasons": ["ingest has no heartbeat"]}
    sample["processes"]["ingest"]["state"] = "FATAL"
    text = render_text(sample)
    assert "CRITICAL" in lines_of(text)[0]
    assert "ingest has no heartbeat" in text
    assert "FATAL" in text


def test_direct_origin_says_the_health_api_was_bypassed(sample):
    sample["origin"] = "direct"
    header = lines_of(render_text(sample))[0]
    assert "read directly" in header and "health API unreachable" in header


def test_unreachable_redis_shows_its_error(sample):
    sample["redis"]["primary"] = {"url": "redis://***@db.example.com:6379/0", "reachable": False,
                                  "error": "ConnectionError: Connection refused"}
    lines = lines_of(render_text(sample, width=120))
    primary_line = next(line for line in lines if line.startswith("primary"))
    assert "unreachable" in primary_line and "Connection refused" in primary_line
    assert "redis://***@db.example.com:6379/0" in primary_line


def test_backlog_not_draining_shows_trades_and_entries(sample):
    sample["backlog"] = {"entries": 3, "trades": 1234, "draining": False}
    backlog_line = next(line for line in lines_of(render_text(sample)) if line.startswith("backlog"))
    assert "1,234 trades in 3 entries" in backlog_line and "/" not in backlog_line


def test_stale_document_is_marked(sample):
    frame = monitor.render(sample, now_ms=sample["generated_ms"] + 42_000)
    console = monitor.Console(file=__import__("io").StringIO(), width=80, color_system=None)
    console.print(frame)
    assert "stale: 42s old" in console.file.getvalue()


# --- the small pictures ---------------------------------------------------------------------------

def test_sparkline_of_a_rising_series_ascends():
    line = sparkline([1, 2, 3, 4, 5, 6, 7, 8])
    assert line == "▁▂▃▄▅▆▇█"


def test_sparkline_scales_to_the_range_and_keeps_the_newest():
    assert sparkline([10, 20, 30, 40], width=2) == "▁█"
    line = sparkline([97280.1, 97312.45, 97296.0])
    assert line[0] == "▁" and line[1] == "█" and "▁" < line[2] < "█"


def test_sparkline_flat_empty_and_junk():
    flat = sparkline([5, 5, 5])
    assert len(flat) == 3 and len(set(flat)) == 1
    assert sparkline([]) == ""
    assert sparkline(None) == ""
    assert sparkline(["97000.5", None, "x", 97001.5]) == "▁█"


def test_timeline_marks_an_ongoing_failover_at_the_right_end():
    now = 1_795_700_000_000
    bar = failover_timeline([{"start_ms": now - 18_000, "end_ms": None}], now, window_ms=600_000, width=40)
    assert len(bar) == 40
    # 15 s cells: 18 s ago is in the second last cell, now is in the last one.
    assert bar[-2:] == "██"
    assert bar[:-2] == "─" * 38
    recent = failover_timeline([{"start_ms": now - 3_000, "end_ms": None}], now, window_ms=600_000, width=40)
    assert recent == "─" * 39 + "█"


def test_timeline_places_a_finished_failover_and_ignores_old_ones():
    now = 1_795_700_000_000
    failovers = [{"start_ms": now - 300_000, "end_ms": now - 287_500},   # the middle of a 10 min bar
                 {"start_ms": now - 900_000, "end_ms": now - 800_000}]   # before the window
    bar = failover_timeline(failovers, now, window_ms=600_000, width=40)
    assert bar.index("█") == 20 and bar.count("█") == 1
    assert bar[-1] == "─"


def test_timeline_without_failovers_or_time():
    assert failover_timeline([], 1000, width=10) == "─" * 10
    assert failover_timeline([{"start_ms": 1}], None, width=10) == ""
    assert failover_timeline([{"start_ms": "junk"}, "junk"], 10_000, width=10) == "─" * 10


def test_human_formats():
    assert monitor.format_age_ms(310) == "310ms"
    assert monitor.format_age_ms(42_000) == "42s"
    assert monitor.format_duration(185) == "3m05s"
    assert monitor.format_duration(3605.2) == "1h00m"
    assert monitor.format_duration(None) == "-"
    assert monitor.format_price("97312.45000000") == "97312.45"
    assert monitor.format_price("1E+2") == "100.00"
    assert monitor.format_price("97298.1234") == "97298.1234"
    assert monitor.format_price("nan") == "-"
    assert monitor.progress_bar(1640, 4120, 10) == "████░░░░░░"


# --- configuration of the command -----------------------------------------------------------------

def test_default_url_follows_the_health_address():
    def url(**environ):
        return status_url(config_module.load({"BTCFEED_STATE_DIR": "/tmp/unused", **environ}))
    assert url() == "http://127.0.0.1:8079/status"
    # A wildcard bind address is reached through the loopback interface.
    assert url(BTCFEED_HEALTH_ADDR="0.0.0.0:9001") == "http://127.0.0.1:9001/status"
    assert url(BTCFEED_HEALTH_ADDR="[::1]:9002") == "http://[::1]:9002/status"
    assert url(BTCFEED_HEALTH_ADDR="10.0.0.5:9003") == "http://10.0.0.5:9003/status"


# --- the real command -----------------------------------------------------------------------------

def serve_status(body: bytes, token: str = None):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                return self.reply(401, b'{"error": "unauthorized"}')
            if self.path != "/status":
                return self.reply(404, b'{"error": "not found"}')
            self.reply(200, body)

        def reply(self, code, payload):
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, fmt, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/status"


class StatusServer:
    def __init__(self):
        with open(FIXTURE, "rb") as handle:
            self.server, self.url = serve_status(handle.read())
        self.running = True

    def stop(self):
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def status_server():
    server = StatusServer()
    yield server.url
    server.stop()


@pytest.fixture
def isolated_env(tmp_path):
    """Nothing real to fall back to: any direct reading finds no Redis and no supervisord, fast."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("BTCFEED_")}
    env.update(BTCFEED_STATE_DIR=str(tmp_path), BTCFEED_LOCAL_URL=f"unix://{tmp_path}/no-redis.sock",
               BTCFEED_PRIMARY_URL="redis://127.0.0.1:1/0", BTCFEED_HEALTH_ADDR=f"127.0.0.1:{free_port()}")
    return env


def run_once(env, *args, timeout=30):
    return subprocess.run([BIN, "--once", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_once_prints_one_plain_frame(status_server, isolated_env):
    result = run_once({**isolated_env, "COLUMNS": "80", "LINES": "24"}, "--url", status_server)
    assert result.returncode == 0, result.stderr
    assert "97312.45" in result.stdout and "1640/4120" in result.stdout
    assert "\x1b" not in result.stdout  # not a terminal: no colour codes
    lines = lines_of(result.stdout)
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80


def test_once_sends_the_token_and_never_prints_it(isolated_env, tmp_path):
    secret = "s3cret-token-value"
    with open(FIXTURE, "rb") as handle:
        server, url = serve_status(handle.read(), token=secret)
    try:
        good = run_once({**isolated_env, "BTCFEED_HEALTH_TOKEN": secret}, "--url", url)
        (tmp_path / "wrong").write_text("wrong-token-value\n")
        refused = run_once(isolated_env, "--url", url, "--token-file", str(tmp_path / "wrong"))
    finally:
        server.shutdown()
        server.server_close()
    assert good.returncode == 0 and "97312.45" in good.stdout
    assert secret not in good.stdout + good.stderr
    assert refused.returncode == 3
    assert "401" in refused.stderr and "refused" in refused.stderr
    assert "wrong-token-value" not in refused.stdout + refused.stderr


def test_once_with_nothing_reachable_says_so_and_fails(isolated_env):
    url = f"http://127.0.0.1:{free_port()}/status"
    started = time.monotonic()
    result = run_once(isolated_env, "--url", url)
    assert result.returncode == 3
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    message = result.stderr.strip()
    assert "\n" not in message
    assert f"health API at {url} is unreachable" in message and "connection refused" in message
    assert time.monotonic() - started < 15


def test_bad_arguments_are_usage_errors():
    result = subprocess.run([BIN, "--interval", "0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "positive number" in result.stderr and "Traceback" not in result.stderr


def test_a_configuration_error_is_one_line_and_exit_2(isolated_env):
    result = run_once({**isolated_env, "BTCFEED_SOURCES": "foo:BAR"}, "--url", "http://127.0.0.1:1/status")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("btcfeed: configuration error: BTCFEED_SOURCES: unknown exchange 'foo'"), line


def test_the_timeout_is_the_one_given(isolated_env):
    """A health API that accepts the connection and never answers: the message names --timeout's value."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/status"
        started = time.monotonic()
        result = run_once(isolated_env, "--url", url, "--timeout", "0.5")
    assert result.returncode == 3 and "no answer within 0.5s" in result.stderr, result.stderr
    assert time.monotonic() - started < 10


def read_available(fd, into: bytearray, seconds: float, until: bytes = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side of the pty is closed
                return
            if not chunk:
                return
            into.extend(chunk)
            if until is not None and until in into:
                return


def start_in_terminal(url, env):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    process = subprocess.Popen([BIN, "--url", url, "--interval", "0.2"], stdin=slave, stdout=slave,
                               stderr=slave, env=env, start_new_session=True, close_fds=True)
    os.close(slave)
    return process, master


def stop_and_collect(process, master, stop_signal, output: bytearray):
    """Send the signal, keep reading (a full pty would block the process) and return its exit code."""
    try:
        process.send_signal(stop_signal)
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline:
            read_available(master, output, 0.1)
        read_available(master, output, 0.3)
        return process.poll()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_live_view_in_a_terminal_stops_cleanly(status_server, isolated_env, stop_signal):
    process, master = start_in_terminal(status_server, isolated_env)
    output = bytearray()
    read_available(master, output, 2.0)
    code = stop_and_collect(process, master, stop_signal, output)
    text = output.decode("utf-8", "replace")
    assert "97312.45" in text
    assert "\x1b[?1049h" in text  # the alternate screen
    assert code == 0
    assert "Traceback" not in text
    assert "\x1b[?1049l" in text  # back to the normal screen


def test_live_view_survives_the_health_api_going_away(isolated_env):
    server = StatusServer()
    process, master = start_in_terminal(server.url, isolated_env)
    output = bytearray()
    try:
        read_available(master, output, 5.0, until=b"97312.45")
        seen_price = b"97312.45" in output
        server.stop()
        read_available(master, output, 3.0, until=b"reading Redis directly failed too")
    finally:
        server.stop()
    code = stop_and_collect(process, master, signal.SIGINT, output)
    text = output.decode("utf-8", "replace")
    assert seen_price
    # (connection refused, or reset when the server went away in the middle of an answer)
    assert f"health API at {server.url} is unreachable: connection re" in text
    assert "the figures below are the last ones read" in text  # the last document stays on screen
    assert code == 0 and "Traceback" not in text


def test_live_output_to_a_pipe_prints_frame_after_frame(status_server, isolated_env):
    process = subprocess.Popen([BIN, "--url", status_server, "--interval", "0.2"], env=isolated_env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == 0
    assert stdout.count("97312.45") >= 2
    assert "\x1b" not in stdout and "Traceback" not in stderr


def test_a_second_stop_signal_does_not_interrupt_the_clean_up():
    stop = monitor.StopSignals()
    with pytest.raises(monitor.StopRequested):
        stop.handle(signal.SIGINT, None)
    stop.handle(signal.SIGTERM, None)  # only noted
    assert stop.requested
    # No `except Exception` on the way can swallow the stop.
    assert not issubclass(monitor.StopRequested, Exception)


def test_a_recorded_status_document_renders_the_newest_events():
    """A document recorded from the real stack during its second failover (events newest first)."""
    path = os.path.join(ROOT, "tests", "fixtures", "status-recorded.json")
    with open(path) as handle:
        recorded = json.load(handle)
    text = render_text(recorded, width=80, height=24)
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    assert "failover" in lines[0].lower() or "DEGRADED" in lines[0]
    assert "2 failovers, 1 ongoing" in text and "510 entries" in text
    # The newest events (the failover and sync's probe) are on screen, not the start-up noise.
    assert "primary_unhealthy" in lines[-1] and "failover" in text.split("process")[-1]
