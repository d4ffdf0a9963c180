"""The health API and bin/health under hostile or careless surroundings, with real processes, real
redis-servers and real sockets: idle and slow clients are dropped, connections are capped, the token
never follows a redirect, secrets stay out of the failover periods, a name is not loopback, and a
primary that can evict btcfeed's keys is reported everywhere."""

import http.server
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.storage.bus import write_heartbeat
from btcfeed.events import record_event
from btcfeed.lifecycle import EventLog
from tools.redis_process import RedisProcess, free_port
from harness import short_tmpdir, wait_for

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "tok-Hardening-Bearer-0042"
SECRET = "pw-Hardening-Secret-77"


# --- a health process of its own --------------------------------------------------------------------
class HealthProcess:
    """btcfeed.processes.health on a free loopback port, its log in a file."""

    def __init__(self, tmp_path, local: RedisProcess, primary_url: str, **extra):
        self.port = free_port()
        self.log_path = tmp_path / "health.log"
        self.env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_LOCAL_URL": local.url,
                    "BTCFEED_PRIMARY_URL": primary_url, "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{self.port}",
                    "BTCFEED_HEALTH_TOKEN": "", "BTCFEED_HEALTH_TOKEN_FILE": "", **extra}
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "btcfeed.processes.health"], cwd=ROOT,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.answers, 20, "the health API to listen")

    def answers(self, timeout_s: float = 5.0) -> bool:
        """Whether a request gets an HTTP answer (a connection closed unanswered is no answer)."""
        try:
            return self.get("/health", timeout_s)[0] is not None
        except OSError:
            return False

    def get(self, path: str, timeout_s: float = 5.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout_s) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def local():
    server = RedisProcess(short_tmpdir("bf-local-"), appendonly=False).start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def evicting_primary():
    server = RedisProcess(short_tmpdir("bf-evict-"), extra_args=["--maxmemory-policy", "allkeys-lru"]).start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def health(tmp_path, local, primary):
    process = HealthProcess(tmp_path, local, primary.url)
    yield process
    process.stop()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset), without waiting."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1024) == b""
    except OSError:
        return True


def timed_get(health: HealthProcess, path: str = "/health"):
    started = time.monotonic()
    code, body = health.get(path, timeout_s=3)
    return code, body, time.monotonic() - started


# --- idle and slow clients, and the connection cap --------------------------------------------------
def test_idle_and_slow_clients_are_dropped_while_the_api_answers(health):
    from btcfeed.httpserver import REQUEST_DEADLINE_S
    idle = [connect(health.port) for _ in range(40)]
    slow = connect(health.port)
    slow.sendall(b"GET /health HTTP/1.0\r\nX-Slow: ")
    try:
        code, _, took = timed_get(health)
        assert code in (200, 503) and took < 1.0, took       # answered (503: no stack runs) at once
        opened = time.monotonic()
        open_ones = set(idle)
        slow_closed = False
        while (open_ones or not slow_closed) and time.monotonic() - opened < REQUEST_DEADLINE_S + 3:
            open_ones = {sock for sock in open_ones if not closed_by_peer(sock)}
            if not slow_closed:
                try:
                    slow.sendall(b"a")                       # a byte well within any read timeout
                except OSError:
                    slow_closed = True
                slow_closed = slow_closed or closed_by_peer(slow)
            time.sleep(0.3)
        assert not open_ones, f"{len(open_ones)} idle connections still open"
        assert slow_closed, "a client sending a byte every 0.3 s was never cut off"
        assert timed_get(health)[2] < 1.0
    finally:
        for sock in idle + [slow]:
            sock.close()


def test_connections_beyond_the_cap_are_closed_at_once_and_the_api_recovers(health):
    from btcfeed.httpserver import MAX_CONNECTIONS, REQUEST_DEADLINE_S
    held = [connect(health.port) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)                                      # all accepted, each holding a slot
        extra = connect(health.port)
        held.append(extra)
        wait_for(lambda: closed_by_peer(extra), 1.0, "the connection over the cap to be closed", 0.05)
        assert not health.answers(timeout_s=1)              # every slot is still held
        # The held ones are dropped at their deadline; the API answers again by itself.
        wait_for(lambda: health.answers(timeout_s=1), REQUEST_DEADLINE_S + 3, "the API to answer again")
    finally:
        for sock in held:
            sock.close()
    assert "Traceback" not in health.log()


# --- bin/health and redirects -----------------------------------------------------------------------
class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers as the server's `answer` says and records the Authorization header of every request."""

    def do_GET(self):
        self.server.seen.append(self.headers.get("Authorization"))
        code, headers, body = self.server.answer
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def serve(answer) -> http.server.HTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    server.answer, server.seen = answer, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("code", [302, 307])
@pytest.mark.parametrize("as_json", [False, True])
def test_bin_health_never_follows_a_redirect_with_the_token(tmp_path, code, as_json):
    elsewhere = serve((200, {"Content-Type": "application/json"}, b'{"redis": {}}'))
    redirector = serve((code, {"Location": f"http://127.0.0.1:{elsewhere.server_port}/status"}, b""))
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_HEALTH_TOKEN": TOKEN,
           "BTCFEED_PRIMARY_URL": "redis://127.0.0.1:1/0",
           "BTCFEED_LOCAL_URL": f"unix://{tmp_path}/none.sock"}
    url = f"http://127.0.0.1:{redirector.server_port}/status"
    try:
        result = subprocess.run([os.path.join(ROOT, "bin", "health"), "--url", url,
                                 *(["--json"] if as_json else [])],
                                env=env, capture_output=True, text=True, timeout=60)
    finally:
        elsewhere.shutdown()
        redirector.shutdown()
    assert redirector.seen == [f"Bearer {TOKEN}"]           # the URL given gets the token
    assert elsewhere.seen == []                              # the redirect's target gets nothing
    assert result.returncode == 3 and TOKEN not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    if as_json:
        document = json.loads(result.stdout)
        assert document["exit_code"] == 3 and "redirect" in document["health"]["reasons"][0]
    else:
        assert result.stdout.startswith(f"btcfeed UNKNOWN: health API at {url}: HTTP {code} redirect")
        assert len(result.stdout.splitlines()) == 1


# --- secrets in the failover periods ----------------------------------------------------------------
def test_failover_reasons_in_the_status_are_scrubbed(tmp_path, local):
    from btcfeed.observability.status import StatusCollector
    cfg = config_module.load({"BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_LOCAL_URL": local.url,
                              "BTCFEED_PRIMARY_URL": f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"})
    client = local.client()
    reason = f"AuthenticationError: invalid password {SECRET} for redis://:{SECRET}@primary"
    record_event(client, EventLog("writer", stream=io.StringIO()), "writer", "failover", reason=reason)
    client.hset(keys.WRITER_STATE, mapping={"state": "failover", "since": int(time.time() * 1000),
                                            "reason": reason})
    collector = StatusCollector(cfg)
    document = collector.collect()
    assert document["failovers"] and "invalid password ***" in document["failovers"][-1]["reason"]
    assert "invalid password ***" in document["writer"]["reason"]
    assert SECRET not in json.dumps(document) and SECRET not in json.dumps(collector.quick_health())


# --- a host name is not loopback --------------------------------------------------------------------
def test_a_name_that_looks_like_loopback_needs_a_token(tmp_path):
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path),
           "BTCFEED_HEALTH_ADDR": f"127.evil.example:{free_port()}",
           "BTCFEED_HEALTH_TOKEN": "", "BTCFEED_HEALTH_TOKEN_FILE": "",
           "BTCFEED_LOCAL_URL": f"unix://{tmp_path}/none.sock"}
    result = subprocess.run([sys.executable, "-m", "btcfeed.processes.health"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    text = result.stdout + result.stderr
    assert result.returncode == 2 and "BTCFEED_HEALTH_TOKEN" in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1


# --- a primary that can evict btcfeed's keys --------------------------------------------------------
def test_eviction_risk_reads_the_policy_of_a_real_server(evicting_primary, primary):
    from btcfeed.storage.primary import eviction_risk
    reason = eviction_risk(evicting_primary.client())
    assert "allkeys-lru" in reason and "noeviction" in reason and "\n" not in reason
    assert eviction_risk(primary.client()) is None
    primary.client().config_set("maxmemory-policy", "volatile-ttl")
    assert "volatile-ttl" in eviction_risk(primary.client())


def beat(local: RedisProcess) -> None:
    """Fresh heartbeats of the processes the verdict watches, so only the primary's risk remains."""
    client = local.client()
    for name in ("ingest", "writer", "sync"):
        write_heartbeat(client, name, {})


def test_an_evicting_primary_is_reported_by_status_health_metrics_and_bin_health(tmp_path, local,
                                                                                 evicting_primary):
    beat(local)
    health = HealthProcess(tmp_path, local, evicting_primary.url)
    try:
        beat(local)
        code, body = health.get("/health")
        document = json.loads(body)
        assert code == 200 and document["status"] == "degraded", document
        assert document["reasons"][0].startswith("primary maxmemory-policy is allkeys-lru, not noeviction")
        primary = json.loads(health.get("/status")[1])["redis"]["primary"]
        assert primary["maxmemory_policy"] == "allkeys-lru" and "allkeys-lru" in primary["eviction_risk"]
        families = {f.name: f for f in text_string_to_metric_families(health.get("/metrics")[1])}
        risk = {s.labels["redis"]: s.value for s in families["btcfeed_redis_eviction_risk"].samples}
        assert risk == {"primary": 1}
        beat(local)
        result = subprocess.run([os.path.join(ROOT, "bin", "health")], env=health.env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout.startswith("btcfeed WARNING: degraded - primary maxmemory-policy is allkeys-lru")
        # Said once in the log and as an event, not at every refresh of the status.
        time.sleep(1.0)
        assert health.log().count("event=primary_eviction_risk") == 1, health.log()
        events = [e for _, e in local.client().xrange(keys.EVENTS) if e[b"event"] == b"primary_eviction_risk"]
        assert len(events) == 1 and b"allkeys-lru" in events[0][b"fields"]
    finally:
        health.stop()


def test_a_safe_primary_has_no_eviction_risk(tmp_path, local, primary):
    beat(local)
    health = HealthProcess(tmp_path, local, primary.url)
    try:
        beat(local)
        assert json.loads(health.get("/health")[1])["status"] == "ok"
        document = json.loads(health.get("/status")[1])
        assert document["redis"]["primary"]["maxmemory_policy"] == "noeviction"
        assert document["redis"]["primary"]["eviction_risk"] is None
        families = {f.name: f for f in text_string_to_metric_families(health.get("/metrics")[1])}
        assert [s.value for s in families["btcfeed_redis_eviction_risk"].samples] == [0]
        assert "primary_eviction_risk" not in health.log()
    finally:
        health.stop()


def test_every_master_of_a_cluster_is_checked(tmp_path):
    from btcfeed.storage.primary import eviction_risk
    from btcfeed.observability.status import StatusCollector
    from harness import Cluster
    cluster = Cluster(masters=3, replicas=0)
    try:
        risky = cluster.nodes[1]
        risky.client().config_set("maxmemory-policy", "volatile-lru")
        reason = eviction_risk(cluster.client())
        assert f"volatile-lru on 127.0.0.1:{risky.port}" in reason
        assert all(str(node.port) not in reason for node in cluster.nodes if node is not risky)
        cfg = config_module.load({"BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_PRIMARY_URL": cluster.url,
                                  "BTCFEED_COMPAT_KEYS": "0",
                                  "BTCFEED_LOCAL_URL": f"unix://{tmp_path}/none.sock"})
        primary = StatusCollector(cfg).collect()["redis"]["primary"]
        assert primary["maxmemory_policy"] == "noeviction,volatile-lru" and primary["eviction_risk"] == reason
    finally:
        cluster.close()
