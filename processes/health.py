"""health: a small HTTP API saying whether trades are flowing (GET /health, JSON)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import redis

from common import keys
from common.bus import read_heartbeats
from common.lifecycle import Process, run_process

WATCHED_PROCESSES = ("ingest", "writer", "sync")
HEARTBEAT_STALE_MS = 5000
# A source with no trade for this long is reported (markets can be quiet; this only warns).
TRADE_AGE_WARN_MS = 60_000


def assess(heartbeats: dict, now_ms: int, writer_state: dict = None) -> dict:
    """Overall status (ok / degraded / critical) and the reasons, from the processes' heartbeats
    and the writer's state record (state, since, reason) in the local Redis."""
    problems, warnings = [], []
    for process in WATCHED_PROCESSES:
        beat = heartbeats.get(process)
        if beat is None:
            problems.append(f"{process} has no heartbeat")
        elif now_ms - beat["ts"] > HEARTBEAT_STALE_MS:
            problems.append(f"{process} heartbeat is {(now_ms - beat['ts']) / 1000:.0f}s old")
    writer = heartbeats.get("writer") or {}
    record = writer_state or {}
    state = record.get("state") or writer.get("state")
    if state in ("failover", "draining"):
        why = f" ({record['reason']})" if record.get("reason") else ""
        warnings.append(f"writer in {state}{why}: trades are kept in the local copy and backlog "
                        "and replayed when the primary is healthy")
    sources = ((heartbeats.get("ingest") or {}).get("sources") or {})
    for name, feed in sources.items():
        if not feed.get("connected"):
            warnings.append(f"{name} is not connected")
        elif feed.get("last_trade_ts") and now_ms - feed["last_trade_ts"] > TRADE_AGE_WARN_MS:
            warnings.append(f"{name}: last trade {(now_ms - feed['last_trade_ts']) / 1000:.0f}s ago")
    status = "critical" if problems else ("degraded" if warnings else "ok")
    return {"status": status, "reasons": problems + warnings,
            "sources": {name: {k: feed.get(k) for k in ("connected", "last_id", "last_trade_ts")}
                        for name, feed in sources.items()},
            "writer": {**{k: writer.get(k) for k in ("state", "applied", "to_backlog", "last_apply_ms")},
                       **({"state": state, "since": record.get("since"), "reason": record.get("reason")}
                          if record else {})}}


class Health(Process):
    name = "health"

    def initialize(self) -> None:
        process = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] != "/health":
                    return self._send(404, {"error": "not found", "paths": ["/health"]})
                document = process.health_document()
                self._send(200 if document["status"] != "critical" else 503, document)

            def _send(self, code, document):
                body = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                pass

        try:
            self.server = ThreadingHTTPServer((self.config.health_host, self.config.health_port), Handler)
        except OSError as exc:
            self.log.error("cannot_listen", addr=f"{self.config.health_host}:{self.config.health_port}",
                           error=str(exc))
            raise SystemExit(1)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        self.log.info("listening", addr=f"{self.config.health_host}:{self.server.server_address[1]}")

    def health_document(self) -> dict:
        now_ms = int(time.time() * 1000)
        try:
            beats = read_heartbeats(self.local, WATCHED_PROCESSES)
            record = {k.decode(): v.decode() for k, v in self.local.hgetall(keys.WRITER_STATE).items()}
        except redis.RedisError as exc:
            return {"status": "critical", "reasons": [f"local Redis unreachable: {type(exc).__name__}"]}
        return assess(beats, now_ms, record)

    def loop_once(self, now: float) -> None:
        self.stopping.wait(1.0)

    def shutdown(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()


def main(argv=None) -> int:
    return run_process(Health, argv)


if __name__ == "__main__":
    raise SystemExit(main())
