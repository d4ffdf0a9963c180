"""GET /metrics: the status document in Prometheus text exposition format (version 0.0.4).

Counters come from the processes' own counts, so they restart at 0 with the process; Prometheus'
rate() and increase() handle such resets.
"""

import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_VALUE = {"ok": 0, "degraded": 1, "critical": 2}
WRITER_STATES = ("primary", "failover", "draining")


class _Exposition:
    """Samples grouped by metric, as the format requires (one HELP/TYPE block per metric)."""

    def __init__(self):
        self.families = {}          # name -> [HELP and TYPE lines, then samples]

    def add(self, name: str, kind: str, help_text: str, value, **labels) -> None:
        if value is None:
            return
        family = self.families.setdefault(name, [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        family.append(f"{name}{_labels(labels)} {_number(value)}")

    def histogram(self, name: str, help_text: str, buckets: dict, count, total, scale: float) -> None:
        family = self.families.setdefault(name, [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"])
        for bound, cumulative in buckets.items():
            le = "+Inf" if bound == "+Inf" else _number(float(bound) * scale)
            family.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        family.append(f"{name}_sum {_number((total or 0) * scale)}")
        family.append(f"{name}_count {count or 0}")

    def text(self) -> str:
        return "\n".join(line for family in self.families.values() for line in family) + "\n"


def render_metrics(doc: dict) -> str:
    out = _Exposition()
    out.add("btcfeed_health_status", "gauge", "Overall status: 0 ok, 1 degraded, 2 critical.",
            HEALTH_VALUE.get((doc.get("health") or {}).get("status"), 2))
    _processes(out, doc.get("processes") or {})
    _redis(out, (doc.get("redis") or {}))
    _writer(out, doc.get("writer") or {}, doc.get("backlog") or {})
    _sources(out, doc.get("sources") or {})
    _consistency(out, doc.get("consistency") or {})
    latency = doc.get("latency_ms") or {}
    if latency.get("buckets"):
        out.histogram("btcfeed_end_to_end_latency_seconds",
                      "Exchange trade time to confirmation by the primary (newest trade of each batch).",
                      latency["buckets"], latency.get("count"), latency.get("sum"), scale=0.001)
    return out.text()


def _consistency(out, consistency: dict) -> None:
    verified = consistency.get("verified_ms")
    out.add("btcfeed_sync_verified_timestamp_seconds", "gauge",
            "Everything the local copy held at this time was verified present in the primary.",
            None if verified is None else verified / 1000)
    out.add("btcfeed_sync_repaired_trades_total", "counter",
            "Trades the primary had lost that anti-entropy re-sent from the local copy.", consistency.get("repaired"))
    out.add("btcfeed_sync_compared_bytes_total", "counter",
            "Seen-set bytes compared between the local copy and the primary.", consistency.get("compared_bytes"))
    out.add("btcfeed_sync_reseed_pending", "gauge", "1 while a re-seed of the primary is under way.",
            int(bool(consistency.get("reseed_pending"))))
    out.add("btcfeed_local_memory_pressure", "gauge",
            "1 while the local Redis is at its memory limit (the mirror is trimmed).",
            int(bool(consistency.get("local_memory_pressure"))))


def _processes(out, processes: dict) -> None:
    for name, info in processes.items():
        if name.startswith("_"):
            continue
        out.add("btcfeed_process_up", "gauge", "1 when supervisord reports the process RUNNING.",
                int(info.get("state") == "RUNNING"), process=name)
        out.add("btcfeed_process_restarts_total", "counter", "Restarts after the process died.",
                info.get("restarts"), process=name)
        out.add("btcfeed_process_uptime_seconds", "gauge", "Seconds since the process started.",
                info.get("uptime_s"), process=name)
        out.add("btcfeed_process_cpu_percent", "gauge", "CPU use since the previous sample.",
                info.get("cpu_percent"), process=name)
        rss = info.get("rss_mb")
        out.add("btcfeed_process_resident_memory_bytes", "gauge", "Resident memory.",
                None if rss is None else round(rss * 2**20), process=name)
        age = info.get("heartbeat_age_ms")
        out.add("btcfeed_process_heartbeat_age_seconds", "gauge", "Age of the process' last heartbeat.",
                None if age is None else age / 1000, process=name)


def _redis(out, servers: dict) -> None:
    for role in ("primary", "local"):
        info = servers.get(role) or {}
        if not info:
            continue
        out.add("btcfeed_redis_up", "gauge", "1 when the server answered the last probe.",
                int(bool(info.get("reachable"))), redis=role)
        latency = info.get("latency_ms")
        out.add("btcfeed_redis_ping_seconds", "gauge", "Round trip of the last PING.",
                None if latency is None else latency / 1000, redis=role)
        memory = info.get("used_memory_mb")
        out.add("btcfeed_redis_used_memory_bytes", "gauge", "used_memory from INFO.",
                None if memory is None else round(memory * 2**20), redis=role)
        # Only once the policy was read: an unreachable primary's risk is unknown, not 0.
        out.add("btcfeed_redis_eviction_risk", "gauge",
                "1 when maxmemory-policy is not noeviction: btcfeed's keys can be evicted.",
                None if info.get("maxmemory_policy") is None else int(bool(info.get("eviction_risk"))),
                redis=role)


def _writer(out, writer: dict, backlog: dict) -> None:
    state = writer.get("state")
    for name in WRITER_STATES:
        out.add("btcfeed_writer_state", "gauge", "1 for the writer's current state.",
                int(state == name), state=name)
    out.add("btcfeed_writer_state_seconds", "gauge", "Seconds in the current writer state.",
            writer.get("for_s"))
    out.add("btcfeed_writer_trades_applied_total", "counter", "Trades newly applied to the primary.",
            writer.get("applied"))
    out.add("btcfeed_writer_trades_skipped_total", "counter", "Trades the primary already had.",
            writer.get("skipped"))
    out.add("btcfeed_writer_batches_to_backlog_total", "counter", "Batches kept locally during failover.",
            writer.get("to_backlog"))
    out.add("btcfeed_writer_primary_errors_total", "counter", "Primary errors that caused a failover.",
            writer.get("primary_errors"))
    out.add("btcfeed_backlog_entries", "gauge", "Batches waiting in the backlog for the primary.",
            backlog.get("entries"))
    out.add("btcfeed_replay_trades_per_second", "gauge", "Replay rate of the current drain.",
            backlog.get("replay_rate"))
    out.add("btcfeed_replay_eta_seconds", "gauge", "Estimated time until the backlog is replayed.",
            backlog.get("eta_s"))


SOURCE_COUNTERS = (
    ("trades", "btcfeed_source_trades_total", "Trades received from the exchange."),
    ("gaps", "btcfeed_source_gaps_total", "Gaps in the trade ids detected."),
    ("backfilled", "btcfeed_source_backfilled_total", "Trades fetched over REST to fill gaps."),
    ("deadlettered", "btcfeed_source_deadlettered_total", "Messages rejected to the dead-letter stream."),
    ("reconnects", "btcfeed_source_reconnects_total", "Websocket reconnections."),
    ("duplicates", "btcfeed_source_duplicates_total", "Trades received twice and dropped."),
    ("cut_messages", "btcfeed_source_cut_messages_total", "Connections that ended inside a message."),
    ("cut_ids_recovered", "btcfeed_source_cut_ids_recovered_total",
     "Cut messages whose received part named the trade id (fetched over REST)."),
)


def _sources(out, sources: dict) -> None:
    for name, source in sources.items():
        out.add("btcfeed_source_connected", "gauge", "1 when the websocket is connected.",
                int(bool(source.get("connected"))), source=name)
        for field, metric, help_text in SOURCE_COUNTERS:
            out.add(metric, "counter", help_text, source.get(field), source=name)
        out.add("btcfeed_source_trades_per_second", "gauge", "Trades per second (between samples).",
                source.get("trades_per_s"), source=name)
        out.add("btcfeed_source_missing_trades", "gauge", "Trade ids recorded as missing, waiting for the backfill.",
                source.get("missing"), source=name)
        age = source.get("last_trade_age_ms")
        out.add("btcfeed_source_last_trade_age_seconds", "gauge", "Age of the newest trade received.",
                None if age is None else age / 1000, source=name)
        out.add("btcfeed_source_last_trade_id", "gauge", "Id of the newest trade received.",
                source.get("last_id"), source=name)
        price = source.get("last_price")
        out.add("btcfeed_source_last_price", "gauge", "Price of the newest trade received.",
                None if price is None else float(price), source=name)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
