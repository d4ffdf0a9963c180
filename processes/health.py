"""health: the HTTP API with the state of everything.

GET /health   200 while trades reach the primary or the local copy durably, else 503 (short JSON)
GET /status   the whole status document (common/observability/status.py)
GET /metrics  the same figures in Prometheus text format

A background sampler refreshes the status document every STATUS_REFRESH_S while somebody reads it
(rates and the price history need consecutive samples, and a slow primary must not slow the API
down), and every IDLE_REFRESH_S when nobody did for WATCHED_FOR_S; /status and /metrics serve the
latest document. A request that finds it older than STALE_AFTER_S (after a quiet spell) wakes the
sampler and waits up to FRESH_WAIT_S for a new one, so no reader gets an old document and a slow
primary still cannot hold a request for long. /health reads the local Redis on every request, so it turns
within a heartbeat of a failover.

Every connection has REQUEST_DEADLINE_S for its request and answer, and at most MAX_CONNECTIONS are
served at once: an idle or slow client (before any token is checked) cannot hold threads forever.
"""

import hmac
import json
import threading
import time

from btcfeed.config import ConfigError, is_loopback
from btcfeed.events import record_event
from btcfeed.httpserver import BoundedHTTPServer, DeadlineHandler
from btcfeed.lifecycle import Process, run_process
from btcfeed.observability.metrics import CONTENT_TYPE, render_metrics
from btcfeed.observability.status import StatusCollector

STATUS_REFRESH_S = 0.5
IDLE_REFRESH_S = 15.0          # a Prometheus scrape (15 s) or any read wakes it sooner
WATCHED_FOR_S = 2.0
STALE_AFTER_S = 1.0
FRESH_WAIT_S = 1.5
PATHS = ("/health", "/status", "/metrics")


class Health(Process):
    name = "health"
    uses_primary = True
    needs_local = False

    def validate(self) -> None:
        host, port = self.config.health_host, self.config.health_port
        if not is_loopback(host) and not self.config.health_token:
            raise ConfigError(f"BTCFEED_HEALTH_ADDR: {host}:{port} is reachable from other hosts; "
                              "set BTCFEED_HEALTH_TOKEN or BTCFEED_HEALTH_TOKEN_FILE (or bind to 127.0.0.1)")

    def initialize(self) -> None:
        host, port, token = self.config.health_host, self.config.health_port, self.config.health_token
        self.collector = StatusCollector(self.config, origin="health")
        self.latest = None                 # (document, JSON bytes, metrics bytes)
        self.read_at = self.refreshed_at = 0.0     # monotonic: the last /status or /metrics, the last refresh
        self.wake = threading.Event()              # a reader wants a fresh document now
        self.fresh = threading.Condition()         # notified after each refresh
        self.eviction_said = None          # the primary's eviction risk as last logged
        self.refresh_status()
        self.server = self._listen(host, port, token)
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        threading.Thread(target=self._sample_forever, name="sampler", daemon=True).start()
        self.log.info("listening", addr=f"{host}:{self.server.server_address[1]}",
                      auth="bearer token" if token else "none (loopback only)")

    def _listen(self, host: str, port: int, token: str) -> BoundedHTTPServer:
        try:
            server = BoundedHTTPServer((host, port), _handler_for(self, token), self.log)
        except OSError as exc:
            self.log.error("cannot_listen", addr=f"{host}:{port}", error=exc.strerror or str(exc))
            raise SystemExit(1)
        return server

    # --- documents ---------------------------------------------------------------------------------
    def refresh_status(self) -> None:
        started = time.monotonic()
        document = self.collector.collect()
        with self.fresh:
            self.latest = (document, json.dumps(document).encode(), render_metrics(document).encode())
            self.refreshed_at = started
            self.fresh.notify_all()
        self._say_eviction_risk(document)

    def latest_for_reader(self):
        """The latest document for /status or /metrics; one older than STALE_AFTER_S is refreshed first
        (waiting at most FRESH_WAIT_S)."""
        asked = self.read_at = time.monotonic()
        if asked - self.refreshed_at > STALE_AFTER_S:
            self.wake.set()
            with self.fresh:
                self.fresh.wait_for(lambda: self.refreshed_at >= asked, FRESH_WAIT_S)
        return self.latest

    def _say_eviction_risk(self, document: dict) -> None:
        """A primary that can evict btcfeed's keys is worth one warning line and event: at start, and
        again only when the risk changes. An unread policy (primary down) changes nothing."""
        primary = (document.get("redis") or {}).get("primary") or {}
        if primary.get("maxmemory_policy") is None or primary.get("eviction_risk") == self.eviction_said:
            return
        self.eviction_said = primary.get("eviction_risk")
        if self.eviction_said:
            record_event(self.local, self.log, self.name, "primary_eviction_risk", level="warning",
                         policy=primary["maxmemory_policy"], reason=self.eviction_said)

    def _sample_forever(self) -> None:
        while not self.stopping.is_set():
            # Unwatched, the thread sleeps until the idle refresh is due (a read wakes it).
            now = time.monotonic()
            watched = now - self.read_at <= WATCHED_FOR_S
            woken = self.wake.wait(STATUS_REFRESH_S if watched
                                   else max(STATUS_REFRESH_S, self.refreshed_at + IDLE_REFRESH_S - now))
            self.wake.clear()
            now = time.monotonic()
            if not woken and now - self.read_at > WATCHED_FOR_S and now - self.refreshed_at < IDLE_REFRESH_S:
                continue
            try:
                self.refresh_status()
            except Exception as exc:       # the API keeps serving the previous document
                self.log.error("status_refresh_failed", error=f"{type(exc).__name__}: {exc}")

    def health_document(self) -> dict:
        return self.collector.quick_health()

    def loop_once(self, now: float) -> None:
        self.stopping.wait(1.0)

    def shutdown(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()

    def stats(self) -> dict:
        return {}


def _handler_for(health: Health, token: str):
    expected = f"Bearer {token}".encode() if token else None

    class Handler(DeadlineHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if expected is not None and not hmac.compare_digest(
                    self.headers.get("Authorization", "").encode(), expected):
                return self._send(401, _json({"error": "a bearer token is required"}))
            if path == "/health":
                document = health.health_document()
                return self._send(503 if document["status"] == "critical" else 200, _json(document))
            _, status_json, metrics = health.latest_for_reader()
            if path == "/status":
                return self._send(200, status_json)
            if path == "/metrics":
                return self._send(200, metrics, CONTENT_TYPE)
            self._send(404, _json({"error": "not found", "paths": list(PATHS)}))

        def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _json(document: dict) -> bytes:
    return json.dumps(document).encode()


def main(argv=None) -> int:
    return run_process(Health, argv)


if __name__ == "__main__":
    raise SystemExit(main())
