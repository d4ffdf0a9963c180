"""The health API, bin/health and the event listener against the real stack, real Redis and real
supervisord, under real faults (SIGKILL of the primary, both Redis down, a crashed process, a
process that reached FATAL)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families


from tools import verify
from btcfeed.events import recent_events
from tools.redis_process import RedisProcess
from harness import SOURCE, drain, remove_stack, short_tmpdir, start_stack, verify_primary, wait_for

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RATE = 1000
SEED = 5


@pytest.fixture(scope="module")
def primary_server():
    server = RedisProcess(short_tmpdir("bf-primary-")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def simulator():
    from harness import Simulator
    sim = Simulator(rate=RATE, seed=SEED)
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def stack(primary_server, simulator):
    running = start_stack(primary_server, simulator)
    yield running
    remove_stack(running)


def api(stack, path: str, token: str = None):
    """(HTTP code, body) of one request to the stack's health API."""
    url = f"http://{stack.env['BTCFEED_HEALTH_ADDR']}{path}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:          # not listening (yet, or any more)
        return None, json.dumps({"status": "unreachable", "error": str(exc.reason)})


def status(stack, token: str = None) -> dict:
    code, body = api(stack, "/status", token)
    assert code == 200, body
    return json.loads(body)


def health(stack) -> tuple:
    code, body = api(stack, "/health")
    return code, json.loads(body)


def bin_health(stack, *args) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(ROOT, "bin", "health"), *args], env=stack.env,
                          capture_output=True, text=True, timeout=60)


def local(stack) -> redis.Redis:
    return redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)


def event_names(stack) -> list:
    return [(e["event"], e["fields"]) for e in recent_events(local(stack), 500)]


def wait_ok(stack, timeout_s: float = 60.0) -> None:
    wait_for(lambda: health(stack)[1]["status"] == "ok", timeout_s, "health to be ok again")


# --- steady state ---------------------------------------------------------------------------------
def test_steady_state_is_ok_everywhere(stack):
    wait_ok(stack, 30)
    code, document = health(stack)
    assert code == 200 and document["status"] == "ok" and document["reasons"] == []
    # /status is refreshed every 0.5 s and rates need two heartbeats: wait for a document made
    # after every process was RUNNING, with a rate.
    doc = wait_for(lambda: (lambda d: d if (d["sources"].get("binance:BTCUSDT") or {}).get("trades_per_s")
                            and all(p.get("state") == "RUNNING" for n, p in d["processes"].items()
                                    if not n.startswith("_")) else None)(status(stack)), 10,
                   "a trade rate in /status with every process RUNNING")
    source = doc["sources"]["binance:BTCUSDT"]
    assert source["connected"] and source["last_id"] > 0 and source["last_trade_age_ms"] < 5000
    assert 300 < source["trades_per_s"] < 3000          # the simulator prints 1,000/s
    assert float(doc["price"]["last"]) > 0 and doc["price"]["source"] == "binance:BTCUSDT"
    for name in ("redis-local", "ingest", "writer", "sync", "health", "api", "listener"):
        info = doc["processes"][name]
        assert info["state"] == "RUNNING" and info["pid"] > 0 and info["uptime_s"] >= 0, (name, info)
        assert info["rss_mb"] and info["rss_mb"] > 1
    for name in ("ingest", "writer", "sync"):
        assert doc["processes"][name]["heartbeat_age_ms"] < 5000
    assert doc["redis"]["primary"]["reachable"] and doc["redis"]["primary"]["role"] == "master"
    assert len(doc["redis"]["primary"]["run_id"]) == 40
    assert doc["redis"]["local"]["reachable"]
    assert doc["writer"]["state"] == "primary" and doc["writer"]["applied"] > 0
    assert doc["backlog"]["entries"] == 0
    assert doc["latency_ms"]["count"] > 0 and doc["latency_ms"]["p99"] is not None
    assert doc["health"]["status"] == "ok"

    result = bin_health(stack)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("btcfeed OK") and "binance:BTCUSDT: connected" in result.stdout
    as_json = json.loads(bin_health(stack, "--json").stdout)
    assert as_json["exit_code"] == 0 and as_json["origin"] == "health" and as_json["note"] is None


def test_metrics_parse_with_the_prometheus_parser(stack):
    def parsed_when_ok():
        # The module's stack is shared: an earlier test's fault (or a moment of a loaded machine)
        # may leave it degraded for a while, so the exposition is read until the verdict is ok.
        code, body = api(stack, "/metrics")
        assert code == 200
        families = {family.name: family for family in text_string_to_metric_families(body)}
        verdict = {s.labels["status"]: s.value for s in families["btcfeed_health_status"].samples}
        assert set(verdict) == {"ok", "degraded", "critical"} and sum(verdict.values()) == 1, verdict
        return families if verdict == {"ok": 1, "degraded": 0, "critical": 0} else None

    families = wait_for(parsed_when_ok, 60, "an exposition whose health verdict is ok")
    latency = families["btcfeed_end_to_end_latency_seconds"]
    assert latency.type == "histogram"
    buckets = [s for s in latency.samples if s.name.endswith("_bucket")]
    assert buckets[-1].labels["le"] == "+Inf"
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and counts[-1] > 0          # cumulative, not empty
    trades = families["btcfeed_source_trades_received"]         # the parser strips _total
    assert trades.type == "counter" and trades.samples[0].labels["source"] == "binance:BTCUSDT"
    assert trades.samples[0].value > 0
    up = {s.labels["process"]: s.value for s in families["btcfeed_process_up"].samples}
    assert up["writer"] == 1 and up["listener"] == 1
    state = {s.labels["state"]: s.value for s in families["btcfeed_writer_state"].samples}
    assert state == {"primary": 1, "failover": 0, "draining": 0, "maintenance": 0}


def test_unknown_path_is_404(stack):
    code, body = api(stack, "/nope")
    assert code == 404 and "/status" in body


# --- processes --------------------------------------------------------------------------------------
def test_a_killed_process_is_visible_and_restarted(stack):
    before = status(stack)["processes"]["writer"]
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for(lambda: (lambda p: p if p["state"] == "RUNNING" and p["pid"] != before["pid"] else None)(
        status(stack)["processes"]["writer"]), 30, "the writer restarted by supervisord")
    assert after["restarts"] == before["restarts"] + 1
    transitions = [fields for name, fields in event_names(stack)
                   if name == "process_state" and fields.get("program") == "writer"]
    assert any(f["to"] == "EXITED" and f.get("expected") == "0" for f in transitions), transitions
    assert any(e["event"] == "process_state" and e["fields"].get("to") == "EXITED"
               for e in status(stack)["events"])
    wait_ok(stack)


def test_fatal_process_is_restarted_by_the_listener(stack):
    """sync is killed every time it starts until supervisord gives up (FATAL); the listener then
    brings it back by itself."""
    killed = set()
    deadline = time.monotonic() + 60
    rpc = stack.rpc()
    while time.monotonic() < deadline:
        info = rpc.supervisor.getProcessInfo("sync")
        if info["statename"] == "FATAL":
            break
        if info["pid"] and info["pid"] not in killed:
            killed.add(info["pid"])
            os.kill(info["pid"], signal.SIGKILL)
        time.sleep(0.05)
    assert rpc.supervisor.getProcessInfo("sync")["statename"] == "FATAL", killed
    fatal_seen = time.monotonic()
    wait_for(lambda: rpc.supervisor.getProcessInfo("sync")["statename"] == "RUNNING", 30,
             "the listener to restart sync")
    assert time.monotonic() - fatal_seen >= 1.0          # with a pause, not in a tight loop
    names = [name for name, fields in event_names(stack) if fields.get("program") == "sync"]
    assert "process_fatal" in names and "process_restarted" in names
    wait_ok(stack)


# --- Redis faults -----------------------------------------------------------------------------------
def test_primary_killed_is_degraded_within_two_seconds(stack, primary_server, simulator):
    wait_ok(stack)
    primary_server.kill()
    killed = time.monotonic()
    wait_for(lambda: health(stack)[1]["status"] == "degraded", 2.0, "/health to say degraded", 0.05)
    print(f"degraded after {time.monotonic() - killed:.3f}s")
    code, document = health(stack)
    assert code == 200                                   # trades are durable locally
    assert any("failover" in reason for reason in document["reasons"]), document
    result = wait_for(lambda: (lambda r: r if r.returncode == 1 else None)(bin_health(stack)), 5,
                      "bin/health to exit 1")
    assert "WARNING" in result.stdout and "failover" in result.stdout
    doc = status(stack)
    assert not doc["redis"]["primary"]["reachable"] and doc["redis"]["primary"]["error"]
    assert doc["failovers"] and doc["failovers"][-1]["end_ms"] is None

    primary_server.start()
    wait_ok(stack)
    # /status is refreshed in the background (every 0.5 s): the hand-back closes the period there too.
    wait_for(lambda: status(stack)["failovers"][-1]["end_ms"] is not None, 5, "the failover period to end")


def test_both_redis_down_is_critical(stack, primary_server, simulator):
    wait_ok(stack)
    primary_server.kill()
    stack.stop("redis-local")
    try:
        wait_for(lambda: health(stack)[0] == 503, 10, "/health to answer 503")
        code, document = health(stack)
        assert document["status"] == "critical" and "local Redis unreachable" in document["reasons"][0]
        # /status (which bin/health reads) is refreshed every 0.5 s: give it that long.
        result = wait_for(lambda: (lambda r: r if r.returncode == 2 else None)(bin_health(stack)), 5,
                          "bin/health to exit 2")
        assert result.stdout.startswith("btcfeed CRITICAL") and "local Redis unreachable" in result.stdout
    finally:
        stack.start("redis-local")
        primary_server.start()
    wait_ok(stack, 90)


def test_bin_health_reads_directly_when_the_api_is_down(stack):
    stack.stop("health")
    try:
        result = bin_health(stack)
        assert result.returncode == 1, result.stdout          # health itself STOPPED: a warning
        assert "did not answer" in result.stdout and "health STOPPED" in result.stdout
        as_json = json.loads(bin_health(stack, "--json").stdout)
        assert as_json["origin"] == "direct" and as_json["sources"]["binance:BTCUSDT"]["connected"]
    finally:
        stack.start("health")


def test_every_trade_exactly_once_after_all_of_the_above(stack, primary_server, simulator):
    wait_ok(stack, 90)
    client = primary_server.client()
    drain(client, simulator)
    first = verify.lowest_trade_id(client, SOURCE)
    verdict = verify_primary(client, simulator, from_id=first)
    assert verdict.exact(), str(verdict)
    simulator.client.resume()


# --- thresholds and argument errors ----------------------------------------------------------------
def test_bin_health_thresholds_and_usage_errors(stack):
    wait_ok(stack)
    strict = bin_health(stack, "--trade-age-warn", "0", "--trade-age-crit", "1000")
    assert strict.returncode == 1 and "last trade" in strict.stdout
    wrong = bin_health(stack, "--no-such-flag")
    assert wrong.returncode == 3 and wrong.stdout.startswith("btcfeed UNKNOWN")
    assert "Traceback" not in wrong.stderr


def test_bin_health_unknown_when_nothing_runs(tmp_path):
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_HEALTH_ADDR": "127.0.0.1:1",
           "BTCFEED_PRIMARY_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([os.path.join(ROOT, "bin", "health")], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "nothing answers" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# --- logs -------------------------------------------------------------------------------------------
LOG_LINE = re.compile(r"^time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z proc=[a-z-]+ "
                      r"level=(DEBUG|INFO|WARNING|ERROR) event=[a-z_]+( |$)")


def test_every_log_line_is_one_key_value_event(stack):
    """After all the faults above: one line per event, time/process/level/event first, no traceback."""
    seen = 0
    for name in ("ingest", "writer", "sync", "health", "api", "listener"):
        with open(stack.log_path(name), errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                assert LOG_LINE.match(line), f"{name}.log:{number}: {line!r}"
                seen += 1
    assert seen > 20


def test_json_log_format(redis_server, tmp_path):
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_LOG_FORMAT": "json",
           "BTCFEED_LOCAL_URL": redis_server.url, "BTCFEED_HEALTH_ADDR": "127.0.0.1:0",
           "BTCFEED_PRIMARY_URL": "redis://127.0.0.1:1/0"}
    process = subprocess.Popen([sys.executable, "-m", "btcfeed.processes.health"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["event"] for r in records][:2] == ["listening", "started"] and records[-1]["event"] == "stopped"
    assert all({"time", "proc", "level", "event"} <= set(r) and r["proc"] == "health" for r in records)
    assert process.returncode == 0 and err == ""
