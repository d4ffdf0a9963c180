"""Pure parts of the status: the verdict, the latency histogram, the failover periods, secrets
kept out, and GET /metrics parsed by the Prometheus client library's own parser."""

import json
import os
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from btcfeed.latency import BUCKETS_MS, LatencyHistogram, newest_trade_ts, quantile_ms
from btcfeed.observability.metrics import render_metrics
from btcfeed.config import scrub, secrets_of
from btcfeed.observability.status import Thresholds, WATCHED, _consistency, _failovers, assess, exit_code
from btcfeed.trade import Trade, encode_batch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(TESTS, "fixtures", "status-sample.json")


def document(ages=None, writer_state="primary", for_s=None, backlog=0, sources=None, processes=None):
    """The parts of a status document the verdict reads; an age of None drops that heartbeat."""
    ages = {**{name: 100 for name in WATCHED}, **(ages or {})}
    procs = {name: {"state": "RUNNING", "heartbeat_age_ms": age} for name, age in ages.items()}
    procs.update(processes or {})
    return {"processes": procs, "writer": {"state": writer_state, "for_s": for_s, "reason": "refused"},
            "backlog": {"entries": 1 if backlog else 0, "trades": backlog},
            "sources": sources if sources is not None else
            {"binance:BTCUSDT": {"connected": True, "last_trade_age_ms": 300}}}


def test_all_fresh_is_ok():
    verdict = assess(document())
    assert verdict == {"status": "ok", "reasons": []}
    assert exit_code(verdict["status"]) == 0


@pytest.mark.parametrize("process", WATCHED)
def test_missing_heartbeat_is_critical(process):
    verdict = assess(document(ages={process: None}))
    assert verdict["status"] == "critical" and verdict["reasons"] == [f"{process} has no heartbeat"]
    assert exit_code(verdict["status"]) == 2


def test_heartbeat_exactly_at_the_limit_is_still_fresh():
    limit_ms = Thresholds().heartbeat_stale_s * 1000
    assert assess(document(ages={"writer": limit_ms}))["status"] == "ok"
    assert assess(document(ages={"writer": limit_ms + 1}))["status"] == "critical"


def test_local_redis_unreachable_is_critical_whatever_else():
    verdict = assess(document(ages={n: None for n in WATCHED}), local_error="ConnectionError: refused")
    assert verdict["status"] == "critical"
    assert verdict["reasons"][0].startswith("local Redis unreachable")
    assert not any("heartbeat" in reason for reason in verdict["reasons"])   # one cause, said once


@pytest.mark.parametrize("state", ["failover", "draining"])
def test_writer_away_from_the_primary_is_degraded(state):
    verdict = assess(document(writer_state=state, for_s=3.0))
    assert verdict["status"] == "degraded" and exit_code("degraded") == 1
    assert verdict["reasons"][0].startswith(f"writer in {state} for 3s (refused)")


def test_failover_longer_than_the_critical_threshold_is_critical():
    thresholds = Thresholds(failover_crit_s=60)
    assert assess(document(writer_state="failover", for_s=59), thresholds)["status"] == "degraded"
    assert assess(document(writer_state="failover", for_s=61), thresholds)["status"] == "critical"


def test_failover_shorter_than_the_warning_threshold_is_ok():
    thresholds = Thresholds(failover_warn_s=30)
    assert assess(document(writer_state="failover", for_s=10), thresholds)["status"] == "ok"


def test_backlog_thresholds_count_trades():
    thresholds = Thresholds(backlog_warn=10, backlog_crit=100)
    assert assess(document(backlog=9), thresholds)["status"] == "ok"
    assert assess(document(backlog=10), thresholds)["status"] == "degraded"
    assert assess(document(backlog=100), thresholds)["status"] == "critical"


def test_trade_age_thresholds():
    thresholds = Thresholds(trade_age_warn_s=60, trade_age_crit_s=300)
    def at(age_ms):
        return assess(document(sources={"binance:BTCUSDT": {"connected": True, "last_trade_age_ms": age_ms}}),
                      thresholds)
    assert at(60_000)["status"] == "ok"
    assert at(95_000) == {"status": "degraded", "reasons": ["binance:BTCUSDT: last trade 95s ago"]}
    assert at(301_000)["status"] == "critical"


def test_source_without_any_trade_yet_is_not_called_quiet():
    sources = {"binance:BTCUSDT": {"connected": True, "last_trade_age_ms": None}}
    assert assess(document(sources=sources))["status"] == "ok"


def test_disconnected_source_is_degraded():
    sources = {"binance:BTCUSDT": {"connected": False, "last_trade_age_ms": 1000},
               "coinbase:BTC-USD": {"connected": True, "last_trade_age_ms": 10}}
    assert assess(document(sources=sources)) == {"status": "degraded",
                                                 "reasons": ["binance:BTCUSDT is not connected"]}


def test_fatal_process_is_critical_and_stopped_one_degraded():
    verdict = assess(document(processes={"health": {"state": "STOPPED"}}))
    assert verdict == {"status": "degraded", "reasons": ["health is STOPPED"]}
    fatal = document(processes={"sync": {"state": "FATAL", "heartbeat_age_ms": 100}})
    assert assess(fatal)["status"] == "critical"


def test_problems_come_before_warnings():
    sources = {"binance:BTCUSDT": {"connected": False}}
    verdict = assess(document(ages={"writer": None}, sources=sources))
    assert verdict["reasons"] == ["writer has no heartbeat", "binance:BTCUSDT is not connected"]


def test_unknown_status_is_exit_3():
    assert exit_code("unreachable") == 3


# --- latency ------------------------------------------------------------------------------------------
def test_histogram_is_cumulative_with_prometheus_bounds():
    histogram = LatencyHistogram()
    for value in (0.5, 1.0, 1.5, 3, 7, 100, 10**6, -4):
        histogram.observe(value)
    snapshot = histogram.snapshot()
    assert snapshot["count"] == 8 and list(snapshot["buckets"])[-1] == "+Inf"
    assert snapshot["buckets"]["1"] == 3            # -4 (clock skew) counts as 0; 1.0 is "le 1"
    assert snapshot["buckets"]["2"] == 4 and snapshot["buckets"]["100"] == 7
    assert snapshot["buckets"][str(BUCKETS_MS[-1])] == 7 and snapshot["buckets"]["+Inf"] == 8


def test_quantiles_from_buckets():
    histogram = LatencyHistogram()
    for _ in range(99):
        histogram.observe(1.5)
    histogram.observe(400)
    snapshot = histogram.snapshot()
    assert 1 <= quantile_ms(snapshot, 0.5) <= 2
    assert 250 <= quantile_ms(snapshot, 0.999) <= 500
    assert quantile_ms({"buckets": {}, "count": 0}, 0.5) is None


def test_newest_trade_ts_reads_the_last_row():
    trades = [Trade(1, "1.5", "2", "b", 111, 112), Trade(2, "1.25", "0.1", "s", 222, 223)]
    assert newest_trade_ts(encode_batch(trades)) == 222


# --- failover periods -----------------------------------------------------------------------------------
def test_failover_periods_from_events():
    events = [{"ts": 50, "event": "hand_back"},                      # the end of an older period: ignored
              {"ts": 100, "event": "failover", "fields": {"reason": "a"}},
              {"ts": 150, "event": "failover", "fields": {"reason": "again"}},   # same period
              {"ts": 200, "event": "hand_back"},
              {"ts": 300, "event": "failover", "fields": {"reason": "b"}}]
    assert _failovers(list(reversed(events))) == [
        {"start_ms": 100, "end_ms": 200, "reason": "a"}, {"start_ms": 300, "end_ms": None, "reason": "b"}]


# --- secrets ----------------------------------------------------------------------------------------
def test_passwords_and_tokens_are_scrubbed():
    config = SimpleNamespace(primary_url="redis://user:p%40ss@primary:6379/0",
                             local_url="unix:///tmp/x.sock?password=localpw", health_token="t" * 20,
                             primary_password="")
    text = "AuthenticationError p@ss p%40ss localpw " + "t" * 20
    assert scrub(text, secrets_of(config)) == "AuthenticationError *** *** *** ***"
    separate = SimpleNamespace(primary_url="redis://primary:6379/0", local_url="unix:///x.sock",
                               health_token="", primary_password="file-password")
    assert scrub("WRONGPASS file-password", secrets_of(separate)) == "WRONGPASS ***"


# --- metrics ----------------------------------------------------------------------------------------
def test_metrics_of_the_sample_document_parse():
    with open(FIXTURE) as handle:
        doc = json.load(handle)
    body = render_metrics(doc)
    families = {family.name: family for family in text_string_to_metric_families(body)}
    verdict = {s.labels["status"]: s.value for s in families["btcfeed_health_status"].samples}
    assert verdict == {"ok": 0, "degraded": 1, "critical": 0}
    states = {s.labels["state"]: s.value for s in families["btcfeed_writer_state"].samples}
    assert states == {"primary": 0, "failover": 0, "draining": 1, "maintenance": 0}
    connected = {s.labels["source"]: s.value for s in families["btcfeed_source_connected"].samples}
    assert connected == {"binance:BTCUSDT": 1, "coinbase:BTC-USD": 0}
    latency = families["btcfeed_end_to_end_latency_seconds"]
    bounds = [s.labels["le"] for s in latency.samples if s.name.endswith("_bucket")]
    assert bounds[0] == "0.001" and bounds[-1] == "+Inf"
    count = [s.value for s in latency.samples if s.name.endswith("_count")]
    assert count == [18234112]
    # Every metric name appears in exactly one block (the format requires grouping).
    names = [line.split()[2] for line in body.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_label_values_are_escaped():
    body = render_metrics({"sources": {'odd"name\\x': {"connected": True}}})
    family = next(f for f in text_string_to_metric_families(body) if f.name == "btcfeed_source_connected")
    assert family.samples[0].labels["source"] == 'odd"name\\x'


# --- a primary that can evict btcfeed's keys ----------------------------------------------------------
def test_eviction_reason_names_the_policy_and_every_unsafe_master():
    from btcfeed.storage.primary import eviction_reason
    assert eviction_reason({"primary": "noeviction"}) is None
    assert eviction_reason({"primary": None}) is None                 # not shown: not guessed at
    single = eviction_reason({"primary": "allkeys-lru"})
    assert single.startswith("primary maxmemory-policy is allkeys-lru, not noeviction: ")
    masters = eviction_reason({"10.0.0.2:7001": "volatile-lru", "10.0.0.1:7000": "noeviction",
                               "10.0.0.3:7002": "allkeys-lfu"})
    assert "volatile-lru on 10.0.0.2:7001, allkeys-lfu on 10.0.0.3:7002" in masters and "7000" not in masters


def test_an_evicting_primary_is_degraded_with_its_reason():
    doc = document()
    doc["redis"] = {"primary": {"reachable": True, "maxmemory_policy": "allkeys-lru",
                                "eviction_risk": "evicts"}}
    assert assess(doc) == {"status": "degraded", "reasons": ["evicts"]}


def test_the_quick_health_document_carries_only_the_eviction_risk():
    """GET /health's document has no probe of the primary: that is not "primary not answering"."""
    doc = document()
    doc["redis"] = {"primary": {"eviction_risk": None}}
    assert assess(doc) == {"status": "ok", "reasons": []}


def test_eviction_risk_metric_only_once_the_policy_is_known():
    def gauge(primary):
        body = render_metrics({"redis": {"primary": {"reachable": True, **primary}}})
        family = [f for f in text_string_to_metric_families(body) if f.name == "btcfeed_redis_eviction_risk"]
        return [s.value for s in family[0].samples] if family else None
    assert gauge({"maxmemory_policy": "allkeys-lru", "eviction_risk": "evicts"}) == [1]
    assert gauge({"maxmemory_policy": "noeviction", "eviction_risk": None}) == [0]
    assert gauge({"maxmemory_policy": None, "eviction_risk": None}) is None


def test_a_local_copy_cut_short_of_the_retention_window_is_degraded_until_the_cut_ages_out():
    hour = 3_600_000
    now = 1_765_000_000_000
    state = {"heartbeats": {}, "sync_record": {}, "local_pressure": {},
             "window_cut": {"binance:BTCUSDT": now - 5 * hour, "kraken:BTC/USD": now - 30 * hour}}
    consistency = _consistency(state, now, 24 * hour)
    assert consistency["local_window_short_h"] == {"binance:BTCUSDT": 5.0}     # the 30 h old cut aged out
    doc = document()
    doc["consistency"] = consistency
    verdict = assess(doc)
    assert verdict["status"] == "degraded"
    assert verdict["reasons"] == ["the local copy of binance:BTCUSDT holds 5 h, not the 24 h retention "
                                  "window: the local Redis reached its memory limit; raise maxmemory in "
                                  "deployment/redis-local.conf or lower BTCFEED_RETENTION_HOURS"]
    body = render_metrics({"consistency": consistency})
    family, = [f for f in text_string_to_metric_families(body)
               if f.name == "btcfeed_local_window_short_seconds"]
    assert [(s.labels, s.value) for s in family.samples] == [({"source": "binance:BTCUSDT"}, 5 * 3600)]
    state["window_cut"] = {"binance:BTCUSDT": now - 25 * hour}
    doc["consistency"] = _consistency(state, now, 24 * hour)
    assert assess(doc)["status"] == "ok"


def test_local_memory_pressure_and_a_reseed_are_degraded_with_their_reasons():
    doc = document()
    doc["consistency"] = {"local_memory_pressure": "local Redis at its memory limit (used 9 of 10 bytes)"}
    verdict = assess(doc)
    assert verdict["status"] == "degraded" and "memory limit" in verdict["reasons"][0]
    doc["consistency"] = {"reseed_pending": "primary holds a new epoch for binance:BTCUSDT"}
    verdict = assess(doc)
    assert verdict["status"] == "degraded" and "re-seeding the primary" in verdict["reasons"][0]
