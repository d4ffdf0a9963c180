"""The state of everything in one document: what GET /status serves, what bin/health and
bin/monitor read, and what GET /metrics is rendered from.

The health process keeps one StatusCollector and refreshes it in the background (rates and the
price history need consecutive samples); bin/health builds one directly when the health process
does not answer. Every Redis or supervisor error becomes a field in the document, never an
exception, and no password or token ever reaches it (URLs are redacted, error texts scrubbed).
"""

import collections
import os
import time
import xmlrpc.client
from dataclasses import dataclass, fields

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from supervisor.xmlrpc import SupervisorTransport

from btcfeed import keys
from btcfeed.storage.bus import read_heartbeats
from btcfeed.config import SENTINEL_SCHEME, redact_url, scrub, secrets_of
from btcfeed.events import recent_events
from btcfeed.latency import quantile_ms
from btcfeed.storage.primary import (connect_primary, eviction_reason, is_cluster, master_address,
                                     maxmemory_policies)

VERSION = 1
WATCHED = ("ingest", "writer", "sync")          # without their heartbeat no trade moves
HEARTBEAT_PROCESSES = WATCHED + ("health", "api")
PRICE_HISTORY_POINTS = 120
EVENTS_SHOWN = 20
FAILOVER_SCAN_EVENTS = 500
REDIS_PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Thresholds:
    """When a figure turns the status to degraded (warn) or critical (crit)."""
    trade_age_warn_s: float = 60.0
    trade_age_crit_s: float = 300.0
    backlog_warn: int = 1_000_000              # trades in the backlog
    backlog_crit: int = 4_800_000              # 80% of the default BTCFEED_BACKLOG_MAX_TRADES
    failover_warn_s: float = 0.0               # any failover is worth a warning
    failover_crit_s: float = 3600.0            # an hour on the local copy: someone must look
    heartbeat_stale_s: float = 5.0

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]


STATUS_RANK = {"ok": 0, "degraded": 1, "critical": 2}


class StatusCollector:
    def __init__(self, config, origin: str = "health"):
        self.config = config
        self.origin = origin
        self.secrets = secrets_of(config)
        self.local = _probe_client(config.local_url, REDIS_PROBE_TIMEOUT_S)
        self.primary = connect_primary(config, max(config.primary_timeout_ms, 200))
        self.processes_seen = {}               # pid -> psutil.Process, so cpu_percent has a baseline
        self.previous_counts = {}              # source -> (monotonic time, trades)
        self.rates = {}
        self.price_history = collections.deque(maxlen=PRICE_HISTORY_POINTS)
        self.sentinel = config.primary_url.startswith(SENTINEL_SCHEME + "://")
        self.cluster = is_cluster(config)
        # The primary's eviction risk as last read by collect(): quick_health reports it without
        # asking the primary on every GET /health.
        self.eviction_risk = None

    # --- the whole document ----------------------------------------------------------------------
    def collect(self, thresholds: Thresholds = Thresholds()) -> dict:
        now_ms = int(time.time() * 1000)
        local_state = self._local_state(now_ms)
        doc = {
            "version": VERSION,
            "generated_ms": now_ms,
            "origin": self.origin,
            "processes": self._processes(local_state["heartbeats"], local_state["restarts"], now_ms),
            "redis": {"primary": (self._cluster_info() if self.cluster else
                                  self._redis_info(self.primary, self.config.primary_url)),
                      "local": self._redis_info(self.local, self.config.local_url)},
            "writer": _writer(local_state, now_ms),
            "backlog": _backlog(local_state),
            "consistency": _consistency(local_state, now_ms, self.config.retention_ms),
            "sources": self._sources(local_state["heartbeats"], now_ms),
            "latency_ms": _latency(local_state["heartbeats"]),
            "events": local_state["events"],
            "failovers": _failovers(local_state["failover_events"]),
            "planned": _planned(local_state),
            "price_view": local_state["price_view"],
        }
        if self.sentinel:
            doc["redis"]["primary"]["master"] = self._sentinel_master()
        self._eviction(doc["redis"]["primary"])
        doc["price"] = self._price(doc["sources"])
        doc["health"] = assess(doc, thresholds, local_error=local_state["error"])
        return doc

    def quick_health(self, thresholds: Thresholds = Thresholds()) -> dict:
        """Only what the local Redis says (heartbeats, writer state, backlog): cheap enough for
        every GET /health, and current to the last heartbeat."""
        now_ms = int(time.time() * 1000)
        state = self._local_state(now_ms, with_events=False)
        doc = {"generated_ms": now_ms, "writer": _writer(state, now_ms), "backlog": _backlog(state),
               "consistency": _consistency(state, now_ms, self.config.retention_ms),
               "sources": self._sources(state["heartbeats"], now_ms, update_rates=False),
               "processes": {name: {"heartbeat_age_ms": _age(beat, now_ms)}
                             for name, beat in state["heartbeats"].items()},
               "redis": {"primary": {"eviction_risk": self.eviction_risk}}}
        return {**assess(doc, thresholds, local_error=state["error"]),
                "writer": {k: doc["writer"].get(k) for k in ("state", "for_s", "reason")},
                "backlog": doc["backlog"].get("entries"), "backlog_trades": doc["backlog"].get("trades"),
                "sources": {name: {k: source.get(k) for k in ("connected", "last_id", "last_trade_age_ms")}
                            for name, source in doc["sources"].items()}}

    # --- local Redis -----------------------------------------------------------------------------
    def _local_state(self, now_ms: int, with_events: bool = True) -> dict:
        state = {"heartbeats": {}, "writer_state": {}, "backlog": None, "backlog_trades": None,
                 "restarts": {}, "events": [], "failover_events": [], "error": None, "local_pressure": {},
                 "sync_record": {}, "move": {}, "price_view": {}, "window_cut": {}}
        try:
            state["heartbeats"] = read_heartbeats(self.local, HEARTBEAT_PROCESSES)
            pipe = self.local.pipeline(transaction=False)
            pipe.hgetall(keys.WRITER_STATE)
            pipe.xlen(keys.BACKLOG)
            pipe.get(keys.BACKLOG_TRADES)
            pipe.hgetall(keys.PROCESS_RESTARTS)
            pipe.hgetall(keys.LOCAL_PRESSURE)
            pipe.hgetall(keys.SYNC_PRIMARY)
            pipe.hgetall(keys.MOVE)
            pipe.hgetall(keys.PRICE)
            pipe.hgetall(keys.LOCAL_WINDOW_CUT)
            (record, state["backlog"], backlog_trades, restarts, pressure, sync_record, move,
             price_view, window_cut) = pipe.execute()
            state["window_cut"] = {k.decode(): int(v) for k, v in window_cut.items()}
            state["backlog_trades"] = int(backlog_trades or 0)
            state["move"] = {k.decode(): v.decode() for k, v in move.items()}
            state["price_view"] = {k.decode(): v.decode() for k, v in price_view.items()}
            state["local_pressure"] = {k.decode(): v.decode() for k, v in pressure.items()}
            state["sync_record"] = {k.decode(): v.decode() for k, v in sync_record.items()}
            state["writer_state"] = {k.decode(): v.decode() for k, v in record.items()}
            if "reason" in state["writer_state"]:
                # An error text from the primary's client: it may quote a password.
                state["writer_state"]["reason"] = scrub(state["writer_state"]["reason"], self.secrets)
            state["restarts"] = {k.decode(): int(v) for k, v in restarts.items()}
            if with_events:
                # One read serves both: the newest events shown, and the failover periods among more.
                events = recent_events(self.local, FAILOVER_SCAN_EVENTS)
                state["events"] = _scrubbed(events[:EVENTS_SHOWN], self.secrets)
                state["failover_events"] = _scrubbed(
                    [e for e in events if e.get("event") in ("failover", "hand_back")], self.secrets)
        except redis.RedisError as exc:
            state["error"] = self._describe(exc)
        return state

    # --- processes -------------------------------------------------------------------------------
    def _processes(self, heartbeats: dict, restarts: dict, now_ms: int) -> dict:
        table = {}
        try:
            infos = self._supervisor().supervisor.getAllProcessInfo()
        except (OSError, xmlrpc.client.Error) as exc:
            infos = []
            table["_supervisor"] = {"reachable": False, "error": self._describe(exc)}
        for info in infos:
            name = info["name"]
            running = info["statename"] == "RUNNING"
            table[name] = {"state": info["statename"], "pid": info["pid"] or None,
                           "uptime_s": round(info["now"] - info["start"], 1) if running else None,
                           "restarts": restarts.get(name, 0),
                           "heartbeat_age_ms": _age(heartbeats.get(name), now_ms),
                           "description": info["description"],
                           **self._resources(info["pid"] if running else 0)}
        for name, beat in heartbeats.items():     # without supervisor, the heartbeats still tell
            if name not in table:
                table[name] = {"state": "unknown", "pid": None, "heartbeat_age_ms": _age(beat, now_ms),
                               "restarts": restarts.get(name, 0)}
        return table

    def _supervisor(self):
        socket_path = os.path.join(self.config.state_dir, "supervisor.sock")
        return xmlrpc.client.ServerProxy(
            "http://127.0.0.1", transport=SupervisorTransport(None, None, "unix://" + socket_path))

    def _resources(self, pid: int) -> dict:
        """CPU (since the previous look at this pid) and resident memory, through psutil."""
        if not pid:
            return {"cpu_percent": None, "rss_mb": None}
        try:
            process = self.processes_seen.get(pid)
            if process is None:
                process = self.processes_seen[pid] = psutil.Process(pid)
                process.cpu_percent(None)          # the baseline; the next look gives a figure
            return {"cpu_percent": round(process.cpu_percent(None), 1),
                    "rss_mb": round(process.memory_info().rss / 2**20, 1)}
        except psutil.Error:
            self.processes_seen.pop(pid, None)
            return {"cpu_percent": None, "rss_mb": None}

    # --- Redis servers ---------------------------------------------------------------------------
    def _redis_info(self, client, url: str) -> dict:
        out = {"url": redact_url(url), "reachable": False, "latency_ms": None, "role": None,
               "run_id": None, "used_memory_mb": None, "error": None}
        try:
            started = time.perf_counter()
            client.ping()
            out["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            info = client.info()
            out.update(reachable=True, role=info.get("role"), run_id=info.get("run_id"),
                       used_memory_mb=round(info.get("used_memory", 0) / 2**20, 1))
        except redis.RedisError as exc:
            out["error"] = self._describe(exc)
        return out

    # --- sources and price -----------------------------------------------------------------------
    def _sources(self, heartbeats: dict, now_ms: int, update_rates: bool = True) -> dict:
        beat = heartbeats.get("ingest") or {}
        feeds = beat.get("sources") or {}
        out = {}
        for name, feed in feeds.items():
            if update_rates and beat.get("ts"):
                self._update_rate(name, beat["ts"] / 1000, feed.get("trades") or 0)
            last_ts = feed.get("last_trade_ts") or None
            out[name] = {"connected": bool(feed.get("connected")), "last_id": feed.get("last_id"),
                         "last_trade_ts": last_ts,
                         "last_trade_age_ms": max(0, now_ms - last_ts) if last_ts else None,
                         "last_price": feed.get("last_price"), "trades_per_s": self.rates.get(name),
                         **{k: feed.get(k, 0) for k in ("trades", "gaps", "backfilled", "deadlettered",
                                                         "reconnects", "duplicates", "missing", "gaps_open",
                                                         "cut_messages", "cut_ids_recovered")},
                         "catching_up": bool(feed.get("catching_up"))}
        return out

    def _update_rate(self, source: str, beat_s: float, trades: int) -> None:
        """Trades/s between two heartbeats of ingest (once a second); samples taken more often
        than that see the same heartbeat twice and keep the last rate."""
        before = self.previous_counts.get(source)
        if before and beat_s == before[0]:
            return
        self.previous_counts[source] = (beat_s, trades)
        if before and beat_s > before[0] and trades >= before[1]:
            self.rates[source] = round((trades - before[1]) / (beat_s - before[0]), 1)

    def _price(self, sources: dict) -> dict:
        for name, source in sources.items():
            if source.get("last_price"):
                if not self.price_history or self.price_history[-1][0] != source["last_trade_ts"]:
                    self.price_history.append((source["last_trade_ts"], float(source["last_price"])))
                return {"source": name, "last": source["last_price"],
                        "history": [price for _, price in self.price_history]}
        return {"source": None, "last": None, "history": []}

    def _cluster_info(self) -> dict:
        """A Redis Cluster primary: its state, its masters and their memory together."""
        out = {"url": redact_url(self.config.primary_url), "reachable": False, "latency_ms": None,
               "role": None, "run_id": None, "used_memory_mb": None, "masters": None, "error": None}
        try:
            started = time.perf_counter()
            state = self.primary.cluster_info().get("cluster_state")
            out["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
            memory = self.primary.info("memory", target_nodes=self.primary.PRIMARIES)
            out.update(reachable=True, role=f"cluster ({state})",
                       masters=sorted(memory), used_memory_mb=round(
                           sum(info.get("used_memory", 0) for info in memory.values()) / 2**20, 1))
        except redis.RedisError as exc:
            out["error"] = self._describe(exc)
        return out

    def _eviction(self, primary: dict) -> None:
        """The primary's maxmemory-policy (every master's, on a cluster) and, when it could evict
        btcfeed's keys, the reason: evicted seen bits mean duplicates, evicted streams lost trades."""
        primary.update(maxmemory_policy=None, eviction_risk=None)
        policies = self._maxmemory_policies() if primary.get("reachable") else {}
        if policies:
            primary.update(maxmemory_policy=",".join(sorted({p for p in policies.values() if p})) or None,
                           eviction_risk=eviction_reason(policies))
        self.eviction_risk = primary["eviction_risk"]

    def _maxmemory_policies(self) -> dict:
        try:
            return maxmemory_policies(self.primary)
        except redis.RedisError:
            return {}                       # unknown now: the primary's reachability says why

    def _sentinel_master(self):
        """host:port of the master the sentinels name now (which node the feed writes to)."""
        try:
            host, port = master_address(self.config, max(self.config.primary_timeout_ms, 200))
            return f"{host}:{port}"
        except redis.RedisError as exc:
            return f"unknown ({self._describe(exc)})"

    def _describe(self, exc: Exception) -> str:
        # First line only, and not the client reprs some errors append after " : ".
        text = (str(exc).splitlines() or [""])[0].split(" : ")[0][:300]
        return scrub(f"{type(exc).__name__}: {text}", self.secrets)


# --- pieces of the document (pure functions of what was read) -------------------------------------
def _writer(local_state: dict, now_ms: int) -> dict:
    beat = local_state["heartbeats"].get("writer") or {}
    record = local_state["writer_state"]
    since = int(record["since"]) if record.get("since") else None
    return {"state": record.get("state") or beat.get("state"), "since_ms": since,
            "for_s": round((now_ms - since) / 1000, 1) if since else None, "reason": record.get("reason"),
            **{k: beat.get(k)
               for k in ("applied", "skipped", "to_backlog", "primary_errors", "last_apply_ms")}}


def _planned(local_state: dict) -> dict:
    """The planned operations: a pause of the primary (who, why, since when) and the latest move of the
    feed to a new primary (its phase, who asked, when, how long, trades copied)."""
    record = local_state["writer_state"]
    paused = None
    if record.get("state") == "maintenance":
        paused = {"by": record.get("by"), "reason": record.get("reason"),
                  "since_ms": int(record["paused_ms"]) if record.get("paused_ms") else None}
    move = local_state["move"]
    moved = None
    if move:
        moved = {"phase": move.get("phase"), "to": move.get("to"), "by": move.get("by"),
                 "started_ms": int(move["started_ms"]) if move.get("started_ms") else None,
                 "seconds": float(move["seconds"]) if move.get("seconds") else None,
                 "trades_copied": int(move.get("copied") or 0)}
    return {"maintenance": paused, "move": moved}


def _consistency(local_state: dict, now_ms: int, retention_ms: int) -> dict:
    """What sync's anti-entropy knows: how recently the primary was verified against the local copy,
    a re-seed or sweep under way, and what it re-sent; and the sources whose local copy the memory
    limit cut short of the retention window (hours it holds, keys.LOCAL_WINDOW_CUT)."""
    sync = local_state["heartbeats"].get("sync") or {}
    record = local_state["sync_record"]
    verified = int(record.get("verified_ms") or 0) or None
    out = {"verified_ms": verified,
           "verified_age_s": round((now_ms - verified) / 1000, 1) if verified else None,
           "reseed_pending": record.get("sweep"), "sweep": None,
           **{k: sync.get(k) for k in ("repaired", "missing_found", "not_held", "compared_bytes", "sweeps")}}
    if sync.get("sweep_reason"):
        out["sweep"] = {"reason": sync["sweep_reason"], "segments_left": sync.get("sweep_segments_left"),
                        "trades_added": sync.get("sweep_added")}
    out["local_memory_pressure"] = local_state["local_pressure"].get("reason")
    out["retention_h"] = round(retention_ms / 3_600_000, 2)
    out["local_window_short_h"] = {source: round((now_ms - cut_ms) / 3_600_000, 2)
                                   for source, cut_ms in local_state["window_cut"].items()
                                   if cut_ms > now_ms - retention_ms}
    return out


def _backlog(local_state: dict) -> dict:
    sync = local_state["heartbeats"].get("sync") or {}
    entries = local_state["backlog"]
    out = {"entries": entries, "trades": local_state["backlog_trades"],
           "draining": bool(sync.get("draining")), "replay_rate": None, "eta_s": None,
           "drain_done": None, "drain_total": None, "last_replay_rate": sync.get("replay_rate")}
    if sync.get("draining"):
        done = sync.get("drain_entries") or 0
        out.update(drain_done=done, drain_total=done + (entries or 0),
                   replay_rate=sync.get("drain_trade_rate"))
        entry_rate = sync.get("drain_entry_rate") or 0
        if entry_rate > 0 and entries is not None:
            out["eta_s"] = round(entries / entry_rate, 1)
    return out


def _latency(heartbeats: dict) -> dict:
    snapshot = (heartbeats.get("writer") or {}).get("latency") or {}
    return {"count": snapshot.get("count", 0), "p50": quantile_ms(snapshot, 0.5),
            "p99": quantile_ms(snapshot, 0.99), "buckets": snapshot.get("buckets") or {},
            "sum": snapshot.get("sum", 0.0)}


def _failovers(events: list) -> list:
    """Failover periods, oldest first: from a writer 'failover' event to the next 'hand_back'."""
    periods = []
    for event in sorted(events, key=lambda e: e["ts"]):
        if event["event"] == "failover" and (not periods or periods[-1]["end_ms"] is not None):
            periods.append({"start_ms": event["ts"], "end_ms": None,
                            "reason": (event.get("fields") or {}).get("reason")})
        elif event["event"] == "hand_back" and periods and periods[-1]["end_ms"] is None:
            periods[-1]["end_ms"] = event["ts"]
    return periods


def _age(beat, now_ms: int):
    return max(0, now_ms - beat["ts"]) if beat else None


# --- the verdict ----------------------------------------------------------------------------------
def assess(doc: dict, thresholds: Thresholds = Thresholds(), local_error: str = None) -> dict:
    """ok / degraded / critical and the reasons, worst first. Critical means trades are not being
    kept durably anywhere (or soon will not be); degraded means they are, but something is wrong."""
    critical, degraded = [], []
    if local_error:
        critical.append(f"local Redis unreachable ({local_error}): no trade can be kept durably")
    processes = doc.get("processes") or {}
    for name in WATCHED:
        if local_error:
            break
        age = (processes.get(name) or {}).get("heartbeat_age_ms")
        if age is None:
            critical.append(f"{name} has no heartbeat")
        elif age > thresholds.heartbeat_stale_s * 1000:
            critical.append(f"{name} heartbeat is {age / 1000:.0f}s old")
    for name, info in processes.items():
        state = info.get("state")
        if state in ("FATAL", "BACKOFF", "EXITED", "STOPPED") and not name.startswith("_"):
            (critical if state == "FATAL" else degraded).append(f"{name} is {state}")
    _assess_writer(doc, thresholds, critical, degraded)
    _assess_sources(doc, thresholds, critical, degraded)
    primary = (doc.get("redis") or {}).get("primary") or {}
    # "is False": GET /health's document carries only the primary's eviction risk, not its probe.
    if primary.get("reachable") is False and (doc.get("writer") or {}).get("state") == "primary":
        degraded.append(f"primary not answering the health probe ({primary.get('error')})")
    if primary.get("eviction_risk"):
        degraded.append(primary["eviction_risk"])
    status = "critical" if critical else ("degraded" if degraded else "ok")
    return {"status": status, "reasons": critical + degraded}


def _assess_writer(doc, thresholds, critical, degraded) -> None:
    writer = doc.get("writer") or {}
    state, for_s = writer.get("state"), writer.get("for_s") or 0.0
    if state == "maintenance":
        why = f" ({writer['reason']})" if writer.get("reason") else ""
        degraded.append(f"primary paused for maintenance for {for_s:.0f}s{why}: trades are kept in the "
                        "local copy and backlog until `btcfeed primary resume`")
    elif state in ("failover", "draining"):
        why = f" ({writer['reason']})" if writer.get("reason") else ""
        message = (f"writer in {state} for {for_s:.0f}s{why}: trades are kept in the local copy "
                   "and backlog and replayed when the primary is healthy")
        if for_s > thresholds.failover_crit_s:
            critical.append(message)
        elif for_s >= thresholds.failover_warn_s:
            degraded.append(message)
    consistency = doc.get("consistency") or {}
    if consistency.get("local_memory_pressure"):
        degraded.append(f"{consistency['local_memory_pressure']}: the local copy keeps a shorter window")
    for source, hours in sorted((consistency.get("local_window_short_h") or {}).items()):
        degraded.append(f"the local copy of {source} holds {hours:g} h, not the "
                        f"{consistency['retention_h']:g} h retention window: the local Redis reached its "
                        "memory limit; raise maxmemory in deployment/redis-local.conf or lower "
                        "BTCFEED_RETENTION_HOURS")
    if consistency.get("reseed_pending"):
        degraded.append(f"re-seeding the primary ({consistency['reseed_pending']}); live trades go on")
    trades = (doc.get("backlog") or {}).get("trades") or 0
    if trades >= thresholds.backlog_crit:
        critical.append(f"backlog holds {trades} trades (limit for critical {thresholds.backlog_crit})")
    elif trades >= thresholds.backlog_warn:
        degraded.append(f"backlog holds {trades} trades")


def _assess_sources(doc, thresholds, critical, degraded) -> None:
    for name, source in (doc.get("sources") or {}).items():
        age_ms = source.get("last_trade_age_ms")
        if age_ms is not None and age_ms > thresholds.trade_age_crit_s * 1000:
            critical.append(f"{name}: no trade for {age_ms / 1000:.0f}s")
        elif age_ms is not None and age_ms > thresholds.trade_age_warn_s * 1000:
            degraded.append(f"{name}: last trade {age_ms / 1000:.0f}s ago")
        if not source.get("connected"):
            degraded.append(f"{name} is not connected")


# --- secrets ----------------------------------------------------------------------------------------
def _scrubbed(events: list, secrets) -> list:
    if not secrets:
        return events
    return [{**event, "fields": {k: scrub(str(v), secrets) for k, v in (event.get("fields") or {}).items()}}
            for event in events]


def _probe_client(url: str, timeout_s: float) -> redis.Redis:
    """A client that gives up quickly: the status must not hang on a black-holed server."""
    # One immediate retry on a broken connection (a pooled connection to a restarted server), none
    # on a timeout: a frozen server would cost a second timeout.
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                                health_check_interval=0)


def collect_status(config, thresholds: Thresholds = Thresholds(), origin: str = "direct") -> dict:
    """One document read directly from Redis and supervisor (when the health API is down)."""
    return StatusCollector(config, origin=origin).collect(thresholds)


def exit_code(status: str) -> int:
    """Nagios convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    return {"ok": 0, "degraded": 1, "critical": 2}.get(status, 3)
