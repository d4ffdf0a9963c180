"""bin/sync-check against real redis-servers: a password-protected primary and a local copy, both filled
by the apply script, then made to disagree the ways a real primary can (lost writes, duplicates)."""

import collections
import json
import os
import random
import shutil
import subprocess
import time

import pytest
import redis

from common import keys
from common.apply import BatchApplier, expected_candles, read_candles, read_trades
from common.events import recent_events
from common.redis_process import RedisProcess, free_port
from common.synccheck import IdSet, main, scrub_secrets
from common.trade import Trade
from harness import short_tmpdir

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "binance:BTCUSDT"
PASSWORD = "pw-Zq81-never-printed"
RETENTION_MS = 24 * 3600 * 1000
COUNT = 3000
# A lost range that straddles a seen-set segment boundary (ids are split by id >> 16).
SEGMENT_EDGE = 5_012_324_352
FIRST_ID = SEGMENT_EDGE - 225
MIDDLE_LOSS = list(range(FIRST_ID + 200, FIRST_ID + 251))      # 51 ids
SINGLE_LOSS = [FIRST_ID + 777]
TAIL_LOSS = list(range(FIRST_ID + COUNT - 50, FIRST_ID + COUNT))  # the primary's last 50 writes
EXPECTED_RANGES = [[FIRST_ID + 200, FIRST_ID + 250], [FIRST_ID + 777, FIRST_ID + 777],
                   [FIRST_ID + COUNT - 50, FIRST_ID + COUNT - 1]]
MISSING = len(MIDDLE_LOSS) + len(SINGLE_LOSS) + len(TAIL_LOSS)


def make_trades(count=COUNT, first_id=FIRST_ID, end_ms=None, seed=5):
    """Trades like Binance BTCUSDT prints them, spread over the last ~3 minutes and older than 10 s."""
    rng = random.Random(seed)
    end_ms = end_ms or int(time.time() * 1000) - 10_000
    price = 6_701_234
    trades = []
    for i in range(count):
        price += rng.randint(-40, 40)
        ts = end_ms - (count - i) * 60
        trades.append(Trade(first_id + i, "%d.%02d000000" % divmod(price, 100),
                            "%d.%08d" % divmod(rng.randint(1, 250_000), 10 ** 8),
                            rng.choice(("buy", "sell")), ts, ts + 37))
    return trades


@pytest.fixture(scope="module")
def servers():
    primary = RedisProcess(short_tmpdir("bf-sc-primary-"), appendonly=False).start()
    local = RedisProcess(short_tmpdir("bf-sc-local-"), appendonly=False).start()
    primary.client().config_set("requirepass", PASSWORD)
    yield primary, local
    for server in (primary, local):
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


class Setup:
    def __init__(self, primary: RedisProcess, local: RedisProcess):
        self.primary_server = primary
        self.primary = redis.Redis(host="127.0.0.1", port=primary.port, password=PASSWORD, socket_timeout=5)
        self.local = local.client()
        self.primary_url = f"redis://:{PASSWORD}@127.0.0.1:{primary.port}/0"
        self.local_url = local.url

    def fill(self, client, trades, publish=True):
        applier = BatchApplier(client, RETENTION_MS, SOURCE, publish=publish)
        for start in range(0, len(trades), 500):
            applier.apply_trades(SOURCE, trades[start:start + 500], int(time.time() * 1000))

    def fill_both(self, trades, primary_trades=None):
        self.fill(self.local, trades, publish=False)
        self.fill(self.primary, trades if primary_trades is None else primary_trades)

    def lose_from_primary(self, ids, clear_seen=True):
        """What a real loss looks like: the entries are gone, and so are their seen bits."""
        ids = set(ids)
        doomed = [entry_id for entry_id, fields in self.primary.xrange(keys.trades(SOURCE))
                  if int(fields[b"id"]) in ids]
        assert len(doomed) == len(ids)
        self.primary.xdel(keys.trades(SOURCE), *doomed)
        if clear_seen:
            for trade_id in ids:
                self.primary.setbit(keys.seen_segment(SOURCE, trade_id), trade_id & 0xFFFF, 0)

    def primary_id_counts(self):
        return collections.Counter(t.id for t in read_trades(self.primary, SOURCE))

    def set_writer_state(self, state):
        self.local.hset(keys.WRITER_STATE, mapping={"state": state, "since": int(time.time() * 1000),
                                                    "reason": "ConnectionError: primary went away"})


@pytest.fixture
def setup(servers, monkeypatch, tmp_path):
    primary, local = servers
    s = Setup(primary, local)
    s.primary.flushall()
    s.local.flushall()
    for name in list(os.environ):
        if name.startswith("BTCFEED_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BTCFEED_PRIMARY_URL", s.primary_url)
    monkeypatch.setenv("BTCFEED_LOCAL_URL", s.local_url)
    monkeypatch.setenv("BTCFEED_SOURCES", SOURCE)
    monkeypatch.setenv("BTCFEED_STATE_DIR", str(tmp_path))
    return s


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    assert PASSWORD not in out + err
    assert "Traceback" not in out + err
    return code, out, err


def test_id_set_ranges_match_a_plain_set():
    rng = random.Random(3)
    base = SEGMENT_EDGE - 3 * 65536
    wanted = set()
    for _ in range(300):     # runs of every length, many of them starting on a byte or segment edge
        start = base + rng.choice((rng.randrange(4 * 65536), rng.randrange(4 * 65536) // 8 * 8,
                                   SEGMENT_EDGE - rng.randrange(20)))
        wanted.update(range(start, start + rng.choice((1, 2, 7, 8, 9, 16, 64, 300))))
    ids, other = IdSet(), IdSet()
    for trade_id in wanted:
        assert ids.add(trade_id)
    assert not ids.add(min(wanted))
    removed = set(rng.sample(sorted(wanted), 500))
    for trade_id in removed:
        other.add(trade_id)
    left = ids.difference(other)
    assert len(ids) == len(wanted) and len(left) == len(wanted - removed)
    assert [x for a, b in left.ranges() for x in range(a, b + 1)] == sorted(wanted - removed)
    runs = list(left.ranges())
    assert all(b + 1 < a2 for (_, b), (a2, _) in zip(runs, runs[1:]))    # maximal runs


def test_secrets_are_scrubbed_from_messages():
    url = f"redis://default:{PASSWORD}@db.example.com:6380/0"
    assert scrub_secrets(f"AuthError: {PASSWORD} rejected", url) == "AuthError: *** rejected"
    assert scrub_secrets("x pw%2Fq7 y", "redis://:pw%2Fq7@h:1/0") == "x *** y"
    assert scrub_secrets("token s3cr3t", "redis://h:1/0?password=s3cr3t") == "token ***"


def test_in_sync_is_ok(setup, capsys):
    setup.fill_both(make_trades())
    code, out, _ = run(capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("SYNC-CHECK OK - "), out
    assert f"local {COUNT} primary {COUNT} missing 0 duplicated 0" in lines[1]
    last_id = FIRST_ID + COUNT - 1
    assert "(0 differ)" in lines[1] and f"last id local {last_id} primary {last_id}" in lines[1]
    assert f"redis://***@127.0.0.1:{setup.primary_server.port}/0" in out


def test_lost_writes_are_reported_as_exact_ranges(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades, primary_trades=trades[:-len(TAIL_LOSS)])
    setup.lose_from_primary(MIDDLE_LOSS + SINGLE_LOSS)

    code, out, _ = run(capsys)
    assert code == 2, out
    assert out.startswith(f"SYNC-CHECK CRITICAL - {SOURCE}: {MISSING} trades missing from the primary "
                          "in 3 ranges;"), out
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in EXPECTED_RANGES)
    assert f"  missing: {shown}\n" in out

    code, out, _ = run(capsys, "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["status"] == "critical" and doc["exit_code"] == 2
    (source,) = doc["sources"]
    assert source["missing_ranges"] == EXPECTED_RANGES
    assert source["missing"] == MISSING and source["missing_ranges_total"] == 3
    assert (source["local_trades"], source["primary_trades"]) == (COUNT, COUNT - MISSING)
    assert source["duplicated"] == 0 and source["only_in_primary"] == 0
    assert sum(m["local"] - m["primary"] for m in source["minutes_differing"]) == MISSING
    assert source["last_id"] == {"local": FIRST_ID + COUNT - 1, "primary": FIRST_ID + COUNT - 51}


def test_repair_adds_exactly_the_missing_trades(setup, capsys):
    trades = make_trades()
    lost = set(MIDDLE_LOSS + SINGLE_LOSS + TAIL_LOSS)
    # The batches that never reached the primary: its candles and last hash never saw them either.
    setup.fill_both(trades, primary_trades=[t for t in trades if t.id not in lost])
    assert main([]) == 2
    capsys.readouterr()

    code, out, err = run(capsys, "--repair")
    assert code == 0, out + err
    assert out.startswith(f"SYNC-CHECK OK - repaired {MISSING} trades; "), out
    assert f"repair: {SOURCE}: added {MISSING} of {MISSING} missing trades\n" in out
    counts = setup.primary_id_counts()
    assert sorted(counts) == [t.id for t in trades] and set(counts.values()) == {1}
    assert read_candles(setup.primary, SOURCE) == expected_candles(trades)
    assert int(setup.primary.hget(keys.last(SOURCE), "id")) == trades[-1].id
    repairs = [e for e in recent_events(setup.local, 50) if e["event"] == "repair"]
    assert len(repairs) == 1
    assert repairs[0]["fields"]["added"] == MISSING and repairs[0]["fields"]["source"] == SOURCE
    assert repairs[0]["proc"] == "sync-check"

    assert run(capsys)[0] == 0
    code, out, _ = run(capsys, "--repair", "--json")
    assert code == 0 and json.loads(out)["notes"] == ["nothing to repair"]
    assert len([e for e in recent_events(setup.local, 50) if e["event"] == "repair"]) == 1
    assert set(setup.primary_id_counts().values()) == {1}


def test_repair_json_reports_before_and_after(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades, primary_trades=trades[:-len(TAIL_LOSS)])
    code, out, _ = run(capsys, "--repair", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "ok" and doc["sources"][0]["missing"] == 0
    assert doc["repair"]["added"] == len(TAIL_LOSS)
    assert doc["repair"]["before"]["sources"][0]["missing_ranges"] == [EXPECTED_RANGES[2]]


def test_repair_never_re_adds_a_trade_the_seen_set_marks_applied(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades)
    setup.lose_from_primary(MIDDLE_LOSS, clear_seen=False)     # entries deleted, seen bits kept
    code, out, _ = run(capsys, "--repair")
    assert code == 2, out
    assert f"added 0 of {len(MIDDLE_LOSS)} missing trades ({len(MIDDLE_LOSS)} skipped" in out
    assert len(setup.primary_id_counts()) == COUNT - len(MIDDLE_LOSS)
    assert set(setup.primary_id_counts().values()) == {1}


def test_failover_warns_and_repair_refuses(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades, primary_trades=trades[:-len(TAIL_LOSS)])
    setup.set_writer_state("failover")

    code, out, _ = run(capsys)
    assert code == 1, out
    assert out.startswith("SYNC-CHECK WARNING - writer is in failover"), out
    assert f"missing: {TAIL_LOSS[0]}-{TAIL_LOSS[-1]}" in out

    code, out, _ = run(capsys, "--repair")
    assert code == 1, out
    assert "not repairing: the writer is in failover" in out
    assert setup.primary.xlen(keys.trades(SOURCE)) == COUNT - len(TAIL_LOSS)
    assert not [e for e in recent_events(setup.local, 50) if e["event"] == "repair"]


def test_duplicate_in_the_primary_is_critical(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades)
    twice = trades[1234]
    setup.primary.xadd(keys.trades(SOURCE), twice.fields())
    code, out, _ = run(capsys, "--json")
    assert code == 2
    source = json.loads(out)["sources"][0]
    assert (source["duplicated"], source["duplicated_ids"], source["missing"]) == (1, [twice.id], 0)


def test_trades_still_settling_only_warn(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades)
    now = int(time.time() * 1000)
    fresh = [t._replace(ts=now - 50 + i, rts=now + i) for i, t in enumerate(make_trades(5, FIRST_ID + COUNT))]
    setup.fill(setup.local, fresh, publish=False)
    code, out, _ = run(capsys, "--json")
    assert code == 1, out
    source = json.loads(out)["sources"][0]
    assert (source["settling_missing"], source["missing"], source["missing_ranges"]) == (5, 0, [])


def test_trades_only_in_the_primary_are_not_a_problem(setup, capsys):
    trades = make_trades()
    setup.fill_both(trades[1000:], primary_trades=trades)     # a local copy started later
    code, out, _ = run(capsys, "--json")
    assert code == 0, out
    source = json.loads(out)["sources"][0]
    assert (source["only_in_primary"], source["missing"]) == (1000, 0)


def test_unreachable_primary_is_critical_and_keeps_the_password(setup, capsys, monkeypatch):
    port = free_port()
    monkeypatch.setenv("BTCFEED_PRIMARY_URL", f"redis://user:{PASSWORD}@127.0.0.1:{port}/0")
    started = time.monotonic()
    code, out, _ = run(capsys)
    assert code == 2
    assert time.monotonic() - started < 5
    assert out.startswith("SYNC-CHECK CRITICAL - primary unreachable: ConnectionError"), out
    assert f"redis://***@127.0.0.1:{port}/0" in out
    code, out, _ = run(capsys, "--repair", "--json")
    assert code == 2 and json.loads(out)["status"] == "critical"


@pytest.mark.parametrize("variable, value, expected, lines", [
    ("BTCFEED_PRIMARY_URL", f"http://:{PASSWORD}@example.com", "configuration error: BTCFEED_PRIMARY_URL", 1),
    ("BTCFEED_SOURCES", "binance:", "configuration error: BTCFEED_SOURCES", 1),
    ("BTCFEED_LOCAL_URL", f"redis://127.0.0.1:{free_port()}/0", "unreachable: ConnectionError", 2),
])
def test_bad_configuration_or_local_redis_is_unknown(setup, capsys, monkeypatch, variable, value, expected,
                                                     lines):
    monkeypatch.setenv(variable, value)
    code, out, _ = run(capsys)
    assert code == 3
    assert out.startswith("SYNC-CHECK UNKNOWN - ") and expected in out, out
    assert len(out.strip().splitlines()) == lines, out


def test_usage_error_is_unknown(setup, capsys):
    code, out, _ = run(capsys, "--fix-everything")
    assert code == 3 and out.startswith("SYNC-CHECK UNKNOWN - usage:")


def test_the_command_runs_from_anywhere(setup, tmp_path):
    setup.fill_both(make_trades())
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run([os.path.join(ROOT, "bin", "sync-check"), "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and doc["sources"][0]["local_trades"] == COUNT


def test_same_ids_with_different_trade_times_warn(setup, capsys):
    trades = make_trades()
    moved = trades[:]
    moved[100] = moved[100]._replace(ts=moved[100].ts - 5 * 60_000)
    setup.fill_both(trades, primary_trades=moved)
    code, out, _ = run(capsys, "--json")
    assert code == 1, out
    doc = json.loads(out)
    assert doc["sources"][0]["missing"] == 0 and doc["sources"][0]["minutes_differing_total"] == 2
    assert "different trade times" in doc["summary"]


def test_trades_older_than_the_window_are_not_compared(setup, capsys):
    trades = make_trades()
    day_old = make_trades(100, first_id=FIRST_ID - 1000,
                          end_ms=int(time.time() * 1000) - RETENTION_MS - 60_000)
    setup.fill_both(day_old + trades, primary_trades=trades)     # the primary already trimmed them
    code, out, _ = run(capsys, "--json")
    assert code == 0, out
    assert json.loads(out)["sources"][0]["local_trades"] == COUNT


def test_mirrored_batches_count_as_the_local_copy(setup, capsys):
    """While the primary is healthy the writer keeps whole batches in the local mirror stream."""
    from common.apply import mirror_entry
    from common.trade import encode_batch
    trades = make_trades()
    for start in range(0, len(trades), 500):
        setup.local.xadd(keys.mirror(SOURCE), mirror_entry(encode_batch(trades[start:start + 500])))
    setup.fill(setup.primary, trades[:-40])          # the primary never got the last 40
    code, out, _ = run(capsys, "--json")
    document = json.loads(out)
    assert code == 2
    assert document["sources"][0]["missing_ranges"] == [[trades[-40].id, trades[-1].id]], out
    code, out, _ = run(capsys, "--repair")
    assert code == 0, out
    assert setup.primary_id_counts() == collections.Counter(t.id for t in trades)
