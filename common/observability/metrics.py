"""GET /metrics: the status document as Prometheus metric families, through prometheus_client.

A custom collector turns one status document into families and generate_latest() writes them on a
private registry: the figures belong to the document the API serves, so the process-wide default
registry (and whatever else registers there) never mixes in.

Names follow the Prometheus conventions (docs/metrics.md lists them and the renames): counters end
in _total and restart at 0 with their process (rate() and increase() handle resets); rates are left
to PromQL; moments are Unix timestamps in seconds, so an age is time() - the metric.
"""

import importlib.metadata

from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

# What generate_latest() writes (text format 0.0.4); newer clients name a later format "latest".
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HEALTH_STATES = ("ok", "degraded", "critical")
# maintenance: an operator paused the primary (btcfeed primary pause); trades go on as in failover.
WRITER_STATES = ("primary", "failover", "draining", "maintenance")
# supervisord's process states; "UNKNOWN" also stands for a process seen only by its heartbeat.
PROCESS_STATES = ("STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN")
REDIS_ROLES = ("primary", "local")


def _version() -> str:
    try:
        return importlib.metadata.version("btcfeed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"            # run from a checkout that was never installed


VERSION = _version()


def render_metrics(doc: dict) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusDocumentCollector(doc))
    return generate_latest(registry).decode()


class StatusDocumentCollector(Collector):
    """The families of one status document. A number the document lacks is left out (unknown is not
    0); a flag it does not set is 0 (no re-seed noted is no re-seed)."""

    def __init__(self, doc: dict):
        self.doc = doc

    def collect(self):
        doc, out = self.doc, _Families()
        now_s = _seconds(doc.get("generated_ms"))
        out.info("btcfeed_build", "The running btcfeed's version.", version=VERSION)
        out.gauge("btcfeed_status_generated_timestamp_seconds",
                  "When the status document behind these figures was made (refreshed every 0.5 s).", now_s)
        _health(out, doc.get("health") or {})
        _processes(out, doc.get("processes") or {}, now_s)
        _redis(out, doc.get("redis") or {})
        _writer(out, doc.get("writer") or {}, doc.get("failovers") or [])
        _backlog(out, doc.get("backlog") or {})
        _sources(out, doc.get("sources") or {})
        _consistency(out, doc.get("consistency") or {})
        yield from out.families.values()
        latency = _latency(doc.get("latency_ms") or {})
        if latency is not None:
            yield latency


class _Families:
    """Families by name: one family gathers the samples of every process, source or server."""

    def __init__(self):
        self.families = {}

    def gauge(self, name: str, help_text: str, value, **labels) -> None:
        self._add(GaugeMetricFamily, name, help_text, value, labels)

    def counter(self, name: str, help_text: str, value, **labels) -> None:
        self._add(CounterMetricFamily, name, help_text, value, labels)

    def flag(self, name: str, help_text: str, value, **labels) -> None:
        self._add(GaugeMetricFamily, name, help_text, int(bool(value)), labels)

    def state_set(self, name: str, help_text: str, label: str, states, current, **labels) -> None:
        """One sample per possible state, 1 for the current one: a state shows as a series, and a
        change of state needs no lookup table in the query."""
        for state in states:
            self._add(GaugeMetricFamily, name, help_text, int(state == current), {**labels, label: state})

    def info(self, name: str, help_text: str, **labels) -> None:
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = InfoMetricFamily(name, help_text, labels=list(labels))
        family.add_metric([str(v) for v in labels.values()], {})

    def _add(self, kind, name: str, help_text: str, value, labels: dict) -> None:
        if value is None:
            return
        family = self.families.get(name)
        if family is None:
            family = self.families[name] = kind(name, help_text, labels=list(labels))
        family.add_metric([str(v) for v in labels.values()], float(value))


def _seconds(ms):
    return None if ms is None else ms / 1000


def _ms(seconds):
    return None if seconds is None else seconds * 1000


def _before(now_s, age_ms):
    """The moment an age (in ms, as of the document) points back to."""
    return None if now_s is None or age_ms is None else now_s - age_ms / 1000


def _health(out: _Families, health: dict) -> None:
    # A document without a verdict counts as critical, as bin/health counts one it cannot read.
    status = health.get("status") if health.get("status") in HEALTH_STATES else "critical"
    out.state_set("btcfeed_health_status", "The overall verdict of GET /health: 1 for the current one.",
                  "status", HEALTH_STATES, status)


def _processes(out: _Families, processes: dict, now_s) -> None:
    supervisor = processes.get("_supervisor")
    if processes:
        out.flag("btcfeed_supervisor_up", "1 when supervisord answered the last look at its processes.",
                 not (supervisor and supervisor.get("reachable") is False))
    for name, info in processes.items():
        if not name.startswith("_"):
            _process(out, name, info, now_s)


def _process(out: _Families, name: str, info: dict, now_s) -> None:
    state = (info.get("state") or "UNKNOWN").upper()
    out.flag("btcfeed_process_up", "1 when supervisord reports the process RUNNING.", state == "RUNNING",
             process=name)
    out.state_set("btcfeed_process_state", "The process' supervisord state: 1 for the current one.",
                  "state", PROCESS_STATES, state if state in PROCESS_STATES else "UNKNOWN", process=name)
    out.counter("btcfeed_process_restarts_total", "Restarts after the process died.",
                info.get("restarts"), process=name)
    out.gauge("btcfeed_process_start_time_seconds", "When the process started (Unix time).",
              _before(now_s, _ms(info.get("uptime_s"))), process=name)
    cpu = info.get("cpu_percent")
    out.gauge("btcfeed_process_cpu_usage_ratio",
              "CPU time per second of wall time between two samples (1 = one core busy).",
              None if cpu is None else cpu / 100, process=name)
    rss = info.get("rss_mb")
    out.gauge("btcfeed_process_resident_memory_bytes", "Resident memory.",
              None if rss is None else round(rss * 2**20), process=name)
    out.gauge("btcfeed_process_heartbeat_timestamp_seconds", "When the process last wrote its heartbeat.",
              _before(now_s, info.get("heartbeat_age_ms")), process=name)


def _redis(out: _Families, servers: dict) -> None:
    for role in REDIS_ROLES:
        info = servers.get(role) or {}
        if info:
            _redis_server(out, role, info)


def _redis_server(out: _Families, role: str, info: dict) -> None:
    out.flag("btcfeed_redis_up", "1 when the server answered the last probe.", info.get("reachable"),
             redis=role)
    out.gauge("btcfeed_redis_ping_seconds", "Round trip of the last PING.", _seconds(info.get("latency_ms")),
              redis=role)
    memory = info.get("used_memory_mb")
    out.gauge("btcfeed_redis_used_memory_bytes", "used_memory from INFO (summed over a cluster's masters).",
              None if memory is None else round(memory * 2**20), redis=role)
    # Only once the policy was read: an unreachable primary's risk is unknown, not 0.
    out.gauge("btcfeed_redis_eviction_risk",
              "1 when maxmemory-policy is not noeviction: btcfeed's keys can be evicted.",
              None if info.get("maxmemory_policy") is None else int(bool(info.get("eviction_risk"))),
              redis=role)
    masters = info.get("masters")
    out.gauge("btcfeed_redis_cluster_masters", "Masters of the primary Redis Cluster.",
              None if masters is None else len(masters), redis=role)
    if info.get("reachable"):
        out.info("btcfeed_redis", "What the server said of itself (and the Sentinel master's address).",
                 redis=role, role=info.get("role") or "", maxmemory_policy=info.get("maxmemory_policy") or "",
                 master=info.get("master") or "")


def _writer(out: _Families, writer: dict, failovers: list) -> None:
    out.state_set("btcfeed_writer_state", "The writer's state: 1 for the current one.", "state",
                  WRITER_STATES, writer.get("state"))
    out.gauge("btcfeed_writer_state_since_timestamp_seconds", "When the writer entered its current state.",
              _seconds(writer.get("since_ms")))
    out.gauge("btcfeed_writer_last_apply_timestamp_seconds", "When the writer last applied a batch.",
              _seconds(writer.get("last_apply_ms") or None))
    for field, name, help_text in WRITER_COUNTERS:
        out.counter(name, help_text, writer.get(field))
    last = failovers[-1] if failovers else {}
    out.gauge("btcfeed_failover_last_start_timestamp_seconds",
              "When the newest failover period among the recent events began.",
              _seconds(last.get("start_ms")))
    out.gauge("btcfeed_failover_last_end_timestamp_seconds",
              "When it ended (the hand-back); absent while it lasts.", _seconds(last.get("end_ms")))


WRITER_COUNTERS = (
    ("applied", "btcfeed_writer_trades_applied_total", "Trades newly applied to the primary."),
    ("skipped", "btcfeed_writer_trades_skipped_total", "Trades the primary already had."),
    ("to_backlog", "btcfeed_writer_batches_to_backlog_total", "Batches kept locally during failover."),
    ("primary_errors", "btcfeed_writer_primary_errors_total", "Primary errors that caused a failover."),
)


def _backlog(out: _Families, backlog: dict) -> None:
    out.gauge("btcfeed_backlog_entries", "Batches waiting in the backlog for the primary.",
              backlog.get("entries"))
    out.gauge("btcfeed_backlog_trades", "Trades waiting in the backlog for the primary (the bound's unit).",
              backlog.get("trades"))
    out.flag("btcfeed_backlog_draining", "1 while sync replays the backlog into the primary.",
             backlog.get("draining"))
    out.gauge("btcfeed_backlog_drain_replayed_entries", "Batches the current drain has replayed.",
              backlog.get("drain_done"))
    out.gauge("btcfeed_backlog_drain_entries", "Batches of the current drain, replayed or waiting.",
              backlog.get("drain_total"))
    # Measured by sync over a drain (no counter of replayed trades reaches the document).
    out.gauge("btcfeed_backlog_replay_trades_per_second", "Replay rate of the current drain (sync's figure).",
              backlog.get("replay_rate"))
    out.gauge("btcfeed_backlog_last_replay_trades_per_second", "Replay rate of the last finished drain.",
              backlog.get("last_replay_rate"))
    out.gauge("btcfeed_backlog_replay_eta_seconds", "Estimated time until the backlog is replayed.",
              backlog.get("eta_s"))


SOURCE_COUNTERS = (
    ("trades", "btcfeed_source_trades_received_total", "Trades received from the exchange (live)."),
    ("gaps", "btcfeed_source_gaps_total", "Gaps in the trade ids detected."),
    ("backfilled", "btcfeed_source_backfilled_trades_total", "Trades fetched over REST to fill gaps."),
    ("deadlettered", "btcfeed_source_deadlettered_messages_total",
     "Messages and REST rows rejected to the dead-letter stream."),
    ("reconnects", "btcfeed_source_reconnects_total", "Websocket reconnections."),
    ("duplicates", "btcfeed_source_duplicate_trades_total", "Trades received twice and dropped."),
    ("cut_messages", "btcfeed_source_cut_messages_total", "Connections that ended inside a message."),
    ("cut_ids_recovered", "btcfeed_source_cut_ids_recovered_total",
     "Cut messages whose received part named the trade id (fetched over REST)."),
)


def _sources(out: _Families, sources: dict) -> None:
    for name, source in sources.items():
        _source(out, name, source)


def _source(out: _Families, name: str, source: dict) -> None:
    out.flag("btcfeed_source_connected", "1 when the websocket is connected.", source.get("connected"),
             source=name)
    for field, metric, help_text in SOURCE_COUNTERS:
        out.counter(metric, help_text, source.get(field), source=name)
    out.gauge("btcfeed_source_missing_trades", "Trade ids recorded as missing, waiting for the backfill.",
              source.get("missing"), source=name)
    out.gauge("btcfeed_source_open_gaps", "Gaps recorded and not yet filled.", source.get("gaps_open"),
              source=name)
    if "catching_up" in source:
        out.flag("btcfeed_source_catching_up", "1 while the backfill catches up with the exchange.",
                 source["catching_up"], source=name)
    out.gauge("btcfeed_source_last_trade_timestamp_seconds", "Exchange time of the newest trade received.",
              _seconds(source.get("last_trade_ts")), source=name)
    out.gauge("btcfeed_source_last_trade_id", "Id of the newest trade received.", source.get("last_id"),
              source=name)
    price = source.get("last_price")
    out.gauge("btcfeed_source_last_price", "Price of the newest trade received (in the quote currency).",
              None if price is None else float(price), source=name)


def _consistency(out: _Families, consistency: dict) -> None:
    out.gauge("btcfeed_sync_verified_timestamp_seconds",
              "Everything the local copy held at this time was verified present in the primary.",
              _seconds(consistency.get("verified_ms")))
    for field, name, help_text in SYNC_COUNTERS:
        out.counter(name, help_text, consistency.get(field))
    out.flag("btcfeed_sync_reseed_pending", "1 while a re-seed of the primary is under way.",
             consistency.get("reseed_pending"))
    sweep = consistency.get("sweep") or {}
    out.flag("btcfeed_sync_sweep_running", "1 while sync compares every held segment with the primary.",
             sweep)
    out.gauge("btcfeed_sync_sweep_segments_left", "Segments the running sweep has still to compare.",
              sweep.get("segments_left"))
    out.gauge("btcfeed_sync_sweep_added_trades", "Trades the running sweep has re-sent to the primary.",
              sweep.get("trades_added"))
    out.flag("btcfeed_local_memory_pressure",
             "1 while the local Redis is at its memory limit (the mirror is trimmed).",
             consistency.get("local_memory_pressure"))
    for source, hours in (consistency.get("local_window_short_h") or {}).items():
        out.gauge("btcfeed_local_window_short_seconds",
                  "How far back the local copy of a source goes, when the memory limit cut it shorter than "
                  "the retention window (absent otherwise).", hours * 3600, source=source)


SYNC_COUNTERS = (
    ("repaired", "btcfeed_sync_repaired_trades_total",
     "Trades the primary had lost that anti-entropy re-sent from the local copy."),
    ("missing_found", "btcfeed_sync_missing_trades_found_total", "Trades found missing from the primary."),
    ("not_held", "btcfeed_sync_missing_trades_not_held_total",
     "Trades found missing that the local copy no longer held (trimmed by retention)."),
    ("compared_bytes", "btcfeed_sync_compared_bytes_total",
     "Seen-set bytes compared between the local copy and the primary."),
    ("sweeps", "btcfeed_sync_sweeps_total", "Finished sweeps of every held segment."),
)


def _latency(latency: dict):
    if not latency.get("buckets"):
        return None
    family = HistogramMetricFamily(
        "btcfeed_end_to_end_latency_seconds",
        "Exchange trade time to confirmation by the primary (newest trade of each batch).")
    buckets = [(bound if bound == "+Inf" else floatToGoString(float(bound) / 1000), cumulative)
               for bound, cumulative in latency["buckets"].items()]
    family.add_metric([], buckets, sum_value=(latency.get("sum") or 0) / 1000)
    return family
