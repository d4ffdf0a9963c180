"""GET /metrics follows the Prometheus naming conventions, as read by the client library's own parser;
every name the alerting rules and the Grafana dashboard query is one the exposition of a real recorded
status document carries; docs/metrics.md names what the exposition has."""

import json
import os
import re

import prometheus_client
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from btcfeed.observability.metrics import VERSION, render_metrics
from btcfeed.observability.status import _consistency
from btcfeed.storage.primary import eviction_reason

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECORDED = os.path.join(ROOT, "tests", "fixtures", "status-recorded.json")
ALERTS = os.path.join(ROOT, "deployment", "prometheus", "alerts.yml")
DASHBOARD = os.path.join(ROOT, "deployment", "grafana", "btcfeed-dashboard.json")
DOC = os.path.join(ROOT, "docs", "metrics.md")

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
# Units that have a base unit (seconds, bytes, ratios), and ages (exported as timestamps instead).
NOT_BASE_UNITS = {"percent", "percentage", "ms", "milliseconds", "us", "microseconds", "ns", "minutes",
                  "hours", "days", "kb", "mb", "gb", "kilobytes", "megabytes", "gigabytes", "age", "ago"}
# Rates sync measures over a drain itself: no count of replayed trades reaches the status document.
MEASURED_RATES = {"btcfeed_backlog_replay_trades_per_second", "btcfeed_backlog_last_replay_trades_per_second"}
# Added by Prometheus at scrape time, so never in the exposition.
TARGET_LABELS = {"job", "instance"}


# --- the documents ---------------------------------------------------------------------------------
def recorded_document() -> dict:
    with open(RECORDED) as handle:
        return json.load(handle)


def realistic_document() -> dict:
    """The recorded document (a stack in failover) with what /status has gained since it was recorded,
    made by status.py's own code where it can be: sync's consistency block, the primary's eviction
    policy, and the per-source gap and cut figures ingest's heartbeat now carries."""
    doc = recorded_document()
    now_ms = doc["generated_ms"]
    sync_beat = {"repaired": 0, "missing_found": 0, "not_held": 0, "compared_bytes": 81920, "sweeps": 1}
    window_cut = {next(iter(doc["sources"])): now_ms - 3_600_000}       # the memory limit cut an hour back
    doc["consistency"] = _consistency({"heartbeats": {"sync": sync_beat}, "local_pressure": {},
                                       "sync_record": {"verified_ms": str(now_ms - 4100)},
                                       "window_cut": window_cut}, now_ms, 24 * 3_600_000)
    doc["redis"]["primary"].update(maxmemory_policy="noeviction",
                                   eviction_risk=eviction_reason({"primary": "noeviction"}))
    for source in doc["sources"].values():
        for field in ("missing", "gaps_open", "cut_messages", "cut_ids_recovered"):
            source.setdefault(field, 0)
        source.setdefault("catching_up", False)
    doc["backlog"].setdefault("trades", 4000)
    return doc


@pytest.fixture(scope="module")
def exposition() -> str:
    return render_metrics(realistic_document())


@pytest.fixture(scope="module")
def families(exposition) -> list:
    return list(text_string_to_metric_families(exposition))


@pytest.fixture(scope="module")
def samples(families) -> dict:
    """Sample name (with _total, _bucket ...) -> the label sets it has."""
    out = {}
    for family in families:
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample.labels)
    return out


def declared(exposition: str) -> dict:
    """Metric name as written on its TYPE line -> (type, HELP text)."""
    helps = dict(line[len("# HELP "):].split(" ", 1) for line in exposition.splitlines()
                 if line.startswith("# HELP "))
    return {name: (kind, helps.get(name, "")) for name, kind in
            (line[len("# TYPE "):].split() for line in exposition.splitlines() if line.startswith("# TYPE "))}


# --- the exposition --------------------------------------------------------------------------------
def test_the_recorded_document_renders_and_parses_as_is():
    body = render_metrics(recorded_document())
    names = {family.name for family in text_string_to_metric_families(body)}
    assert {"btcfeed_build_info", "btcfeed_writer_state", "btcfeed_end_to_end_latency_seconds"} <= names


def test_every_family_is_declared_once_with_help(exposition):
    types = [line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    for name, (kind, help_text) in declared(exposition).items():
        assert help_text.strip(), f"{name} has no HELP"


def test_names_follow_the_prometheus_conventions(exposition, families):
    problems = []
    for name, (kind, _) in declared(exposition).items():
        problems += naming_problems(name, kind)
    for family in families:
        problems += [f"{family.name}: label {label!r} is not snake_case"
                     for sample in family.samples for label in sample.labels if not SNAKE.match(label)]
    assert not problems, "\n".join(problems)


def naming_problems(name: str, kind: str) -> list:
    words = name.split("_")
    problems = []
    if not SNAKE.match(name) or words[0] != "btcfeed":
        problems.append(f"{name}: not btcfeed_ and snake_case")
    if (kind == "counter") != name.endswith("_total"):
        problems.append(f"{name}: a {kind}; counters and only counters end in _total")
    if NOT_BASE_UNITS & set(words):
        problems.append(f"{name}: {sorted(NOT_BASE_UNITS & set(words))} is not a base unit")
    if "timestamp" in words and not name.endswith("_timestamp_seconds"):
        problems.append(f"{name}: a timestamp in seconds ends in _timestamp_seconds")
    if name.endswith("_per_second") and name not in MEASURED_RATES:
        problems.append(f"{name}: a rate; export a counter and let PromQL compute rate()")
    if kind == "histogram" and not name.endswith(("_seconds", "_bytes")):
        problems.append(f"{name}: a histogram without its base unit")
    return problems


def test_the_rules_catch_the_old_names():
    assert naming_problems("btcfeed_process_cpu_percent", "gauge")
    assert naming_problems("btcfeed_source_trades_per_second", "gauge")
    assert naming_problems("btcfeed_source_last_trade_age_seconds", "gauge")
    assert naming_problems("btcfeed_source_backfilled", "counter")
    assert naming_problems("btcfeed_backlog_total", "gauge")
    assert not naming_problems("btcfeed_source_trades_received_total", "counter")


def test_values_fit_their_kind(families):
    for family in families:
        for sample in family.samples:
            if family.type == "counter" or family.name.endswith("_ratio"):
                assert sample.value >= 0, sample
            if family.name.endswith("_info"):
                assert sample.value == 1, sample


def test_state_sets_have_exactly_one_current_state(families):
    by_name = {family.name: family for family in families}
    health = {s.labels["status"]: s.value for s in by_name["btcfeed_health_status"].samples}
    assert health == {"ok": 0, "degraded": 1, "critical": 0}          # the recording was in failover
    writer = {s.labels["state"]: s.value for s in by_name["btcfeed_writer_state"].samples}
    assert writer == {"primary": 0, "failover": 1, "draining": 0, "maintenance": 0}
    current = {}
    for sample in by_name["btcfeed_process_state"].samples:
        current[sample.labels["process"]] = current.get(sample.labels["process"], 0) + sample.value
    assert current and set(current.values()) == {1}


def test_build_info_and_timestamps(families):
    by_name = {family.name: family for family in families}
    assert [s.labels for s in by_name["btcfeed_build_info"].samples] == [{"version": VERSION}]
    doc = recorded_document()
    ts = {s.labels["source"]: s.value for s in by_name["btcfeed_source_last_trade_timestamp_seconds"].samples}
    assert ts == {"binance:BTCUSDT": doc["sources"]["binance:BTCUSDT"]["last_trade_ts"] / 1000}
    beats = {s.labels["process"]: s.value
             for s in by_name["btcfeed_process_heartbeat_timestamp_seconds"].samples}
    assert beats["writer"] == pytest.approx((doc["generated_ms"] - 559) / 1000)
    assert "listener" not in beats                      # no heartbeat: no figure, not 0


def test_trades_are_counters_and_rates_are_left_to_promql(samples):
    assert samples["btcfeed_source_trades_received_total"] == [{"source": "binance:BTCUSDT"}]
    assert "btcfeed_writer_trades_applied_total" in samples
    assert not [name for name in samples if name.startswith("btcfeed_source_") and "per_second" in name]


def test_the_default_registry_is_left_alone(exposition):
    render_metrics(recorded_document())
    assert not [family.name for family in prometheus_client.REGISTRY.collect()
                if family.name.startswith("btcfeed_")]


# --- PromQL names ----------------------------------------------------------------------------------
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan"}
SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!=|!~|=)\s*"((?:[^"\\]|\\.)*)"')
IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def selectors(expr: str) -> list:
    """(metric name, [(label, operator, value)]) of every series selector in a PromQL expression.
    Not a full parser: enough for the rules and queries kept here (a test below checks it)."""
    found = [(name, MATCHER.findall(body)) for name, body in SELECTOR.findall(expr) if name]
    rest = SELECTOR.sub(lambda m: " " if not m.group(1) else m.group(1) + " ", expr)
    rest = re.sub(r'"(?:[^"\\]|\\.)*"', " ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", rest)
    bare = [word for word in IDENTIFIER.findall(rest) if word.lower() not in KEYWORDS]
    named = {name for name, _ in found}
    return found + [(word, []) for word in bare if word not in named]


def test_the_selector_reader():
    expr = ('time() - btcfeed_a_seconds > 300 and on(instance, job) btcfeed_b{state="failover"} == 1 '
            'or sum by (le) (rate(btcfeed_c_bucket{instance=~"$instance"}[$__rate_interval])) offset 5m')
    assert sorted(selectors(expr)) == [("btcfeed_a_seconds", []), ("btcfeed_b", [("state", "=", "failover")]),
                                       ("btcfeed_c_bucket", [("instance", "=~", "$instance")])]
    assert selectors("absent(up)") == [("up", [])]


def test_unknown_names_labels_and_values_are_caught(samples):
    assert unknown_in("rate(btcfeed_source_trades_total[1m])", samples) == [
        "btcfeed_source_trades_total is not in the exposition"]
    assert unknown_in('btcfeed_writer_state{state="failed"} == 1', samples) == [
        'btcfeed_writer_state has no state="failed"']
    assert unknown_in('btcfeed_redis_up{role="primary", job="btcfeed"}', samples) == [
        "btcfeed_redis_up has no label role"]


def unknown_in(expr: str, samples: dict) -> list:
    """What an expression asks for that the exposition does not have: a name, a label, a label value."""
    problems = []
    for name, matchers in selectors(expr):
        if name not in samples:
            problems.append(f"{name} is not in the exposition")
            continue
        for label, operator, value in matchers:
            if label in TARGET_LABELS:
                continue
            if not any(label in labels for labels in samples[name]):
                problems.append(f"{name} has no label {label}")
            elif operator == "=" and "$" not in value and not any(
                    labels.get(label) == value for labels in samples[name]):
                problems.append(f'{name} has no {label}="{value}"')
    return problems


def alert_rules() -> list:
    with open(ALERTS) as handle:
        document = yaml.safe_load(handle)
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    with open(DASHBOARD) as handle:
        return json.load(handle)


# --- the alerting rules -----------------------------------------------------------------------------
def test_the_alert_rules_are_well_formed():
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "0s")), rule["alert"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_the_alert_rules_cover_what_an_operator_must_hear_of():
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for name in ("btcfeed_source_last_trade_timestamp_seconds", "btcfeed_backlog_trades",
                 "btcfeed_writer_state_since_timestamp_seconds", "btcfeed_source_missing_trades",
                 "btcfeed_process_restarts_total", "btcfeed_redis_eviction_risk",
                 "btcfeed_local_memory_pressure", "btcfeed_local_window_short_seconds",
                 "btcfeed_sync_reseed_pending",
                 "btcfeed_sync_verified_timestamp_seconds"):
        assert name in exprs, name


def test_every_name_in_the_alert_rules_is_exposed(samples):
    problems = [f"{rule['alert']}: {problem}"
                for rule in alert_rules() for problem in unknown_in(rule["expr"], samples)]
    assert not problems, "\n".join(problems)


# --- the dashboard -----------------------------------------------------------------------------------
def dashboard_queries(board: dict) -> list:
    queries = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query") if isinstance(query, dict) else query
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text).groups()
            queries.append(metric)
            assert label in TARGET_LABELS, label
    return queries


def test_the_dashboard_shows_what_was_asked_for():
    board = dashboard()
    titles = {panel["title"] for panel in board["panels"]}
    assert {"Price", "Trades per second", "Writer state", "Backlog", "End-to-end latency", "Failovers",
            "Process restarts"} <= titles
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in board["panels"])


def test_every_name_in_the_dashboard_is_exposed(samples):
    queries = dashboard_queries(dashboard())
    assert queries
    problems = [f"{query}: {problem}" for query in queries for problem in unknown_in(query, samples)]
    assert not problems, "\n".join(problems)


# --- docs/metrics.md -----------------------------------------------------------------------------------
def doc_tables() -> tuple:
    """(rename rows as (before, now), names in the table of every metric)."""
    with open(DOC) as handle:
        text = handle.read()
    renames_part = text.split("## Renames", 1)[1].split("\n## ", 1)[0]
    every_part = text.split("## Every metric", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in renames_part.splitlines() if line.startswith("| `")]
    listed = [re.match(r"\| `(\w+)`", line).group(1)
              for line in every_part.splitlines() if line.startswith("| `")]
    return rows, listed


def test_the_renames_table_matches_the_exposition():
    rows, _ = doc_tables()
    assert len(rows) >= 10
    exposition = render_metrics(every_figure_document())
    names = set(declared(exposition))
    samples = {sample.name for family in text_string_to_metric_families(exposition)
               for sample in family.samples}
    for before, now in rows:
        old = re.search(r"`(\w+)", before).group(1)
        new = [name for name, _ in selectors(" ".join(re.findall(r"`([^`]+)`", now)))]
        assert new and all(name in samples for name in new), now
        assert old not in names or old in new, f"{old} is still exposed"


def test_every_metric_is_documented_and_nothing_else():
    _, listed = doc_tables()
    assert set(listed) == set(declared(render_metrics(every_figure_document())))


def every_figure_document() -> dict:
    """The realistic document with the figures a stack in failover does not have: a drain under way,
    a finished failover, a sweep, a Cluster primary."""
    doc = realistic_document()
    doc["failovers"][-1]["end_ms"] = doc["generated_ms"]
    doc["backlog"].update(replay_rate=9000, eta_s=1.0, drain_done=10, drain_total=20, draining=True)
    doc["redis"]["primary"]["masters"] = ["10.0.0.1:7000"]
    doc["consistency"]["sweep"] = {"reason": "scheduled", "segments_left": 3, "trades_added": 0}
    return doc
