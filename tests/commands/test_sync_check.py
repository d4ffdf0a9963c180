"""bin/sync-check against real redis-servers: a password-protected primary and a local copy written the
way the writer writes them (the primary applies a batch, the local mirror keeps it and records it as
confirmed; the failover copy in an outage), then made to disagree the ways a real primary can: lost
writes (entries and their seen bits gone together), entries lost although marked applied, duplicates."""

import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
import redis

from btcfeed.storage import epochs

from btcfeed import keys

from btcfeed.commands import synccheck
from btcfeed.storage.antientropy import HeldIndex
from btcfeed.storage.apply import BatchApplier, expected_candles, compressed_batch, read_candles, read_trades
from btcfeed.events import recent_events
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands import cli
from btcfeed.commands.synccheck import IdSet, scrub_secrets
from btcfeed.trade import Trade, encode_batch
from harness import short_tmpdir

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = "binance:BTCUSDT"
PASSWORD = "pw-Zq81-never-printed"
RETENTION_MS = 24 * 3600 * 1000
COUNT = 3000
BATCH = 500
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


def without(trades, ids):
    ids = set(ids)
    return [t for t in trades if t.id not in ids]


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

    def write_like_the_writer(self, trades, primary_trades=None, confirm=True):
        """The writer in primary state: each batch is applied to the primary under the epoch, kept in the
        local mirror, and recorded as confirmed. primary_trades: what the primary holds of them in the
        end (a primary that lost writes looks like one that never took them: entries, seen bits,
        candles and last hash alike); trades it holds that the local copy never had are applied first."""
        applier = BatchApplier(self.primary, RETENTION_MS, SOURCE, epochs=epochs.known_epochs(self.local))
        held = {t.id: t for t in (trades if primary_trades is None else primary_trades)}
        mirrored = {t.id for t in trades}
        earlier = [t for t in held.values() if t.id not in mirrored]
        if earlier:
            applier.apply_trades(SOURCE, earlier)
        for start in range(0, len(trades), BATCH):
            batch = trades[start:start + BATCH]
            reached = [held[t.id] for t in batch if t.id in held]
            if reached:
                applier.apply_trades(SOURCE, reached)
            entry_id = self.local.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch(batch)))
            if confirm:
                self.local.hset(keys.MIRROR_CONFIRMED, SOURCE, entry_id)

    def write_failover_copy(self, trades):
        """The writer in failover: the local copy takes the trades, the primary does not."""
        BatchApplier(self.local, RETENTION_MS, SOURCE, publish=False).apply_trades(SOURCE, trades)

    def lose_from_primary(self, ids, clear_seen=True):
        """Delete the entries from the primary's stream; with clear_seen also their seen bits, as any real
        loss does (the apply script writes both in one atomic step)."""
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

    def repair_events(self):
        return [e for e in recent_events(self.local, 50) if e["event"] == "repair"]

    def set_writer_state(self, state):
        self.local.hset(keys.WRITER_STATE, mapping={"state": state, "since": int(time.time() * 1000),
                                                    "reason": "ConnectionError: primary went away"})


@pytest.fixture
def setup(servers, monkeypatch, tmp_path):
    primary, local = servers
    s = Setup(primary, local)
    s.primary.flushall()
    s.local.flushall()
    epochs.establish(s.local, s.primary, [SOURCE])       # as sync (or the writer) does at its start
    for name in list(os.environ):
        if name.startswith("BTCFEED_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BTCFEED_PRIMARY_URL", s.primary_url)
    monkeypatch.setenv("BTCFEED_LOCAL_URL", s.local_url)
    monkeypatch.setenv("BTCFEED_SOURCES", SOURCE)
    monkeypatch.setenv("BTCFEED_STATE_DIR", str(tmp_path))
    return s


def run(capsys, *args):
    """`btcfeed sync-check ARGS` in this process: its exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["sync-check", *args])
    code = exited.value.code or 0
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
    assert list(left) == sorted(wanted - removed) and len(IdSet.of(removed)) == 500
    runs = list(left.ranges())
    assert all(b + 1 < a2 for (_, b), (a2, _) in zip(runs, runs[1:]))    # maximal runs


def test_secrets_are_scrubbed_from_messages():
    url = f"redis://default:{PASSWORD}@db.example.com:6380/0"
    assert scrub_secrets(f"AuthError: {PASSWORD} rejected", url) == "AuthError: *** rejected"
    assert scrub_secrets("x pw%2Fq7 y", "redis://:pw%2Fq7@h:1/0") == "x *** y"
    assert scrub_secrets("token s3cr3t", "redis://h:1/0?password=s3cr3t") == "token ***"


def test_in_sync_is_ok_and_shows_syncs_watermark(setup, capsys):
    setup.write_like_the_writer(make_trades())
    verified_ms = int(time.time() * 1000) - 2_500
    setup.local.hset(keys.SYNC_PRIMARY, "verified_ms", verified_ms)
    code, out, _ = run(capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("SYNC-CHECK OK - the primary holds every trade of the local copy "
                               f"(2 held segments compared, {COUNT} trades audited, 1 source)"), out
    assert lines[1] == f"{SOURCE}: seen-set comparison: 2 held segments compared, missing 0"
    assert lines[2].startswith(f"{SOURCE}: stream audit: local {COUNT} primary {COUNT} duplicated 0 "
                               "lost-although-marked-applied 0 ")
    last_id = FIRST_ID + COUNT - 1
    assert "(0 differ)" in lines[2] and f"last id local {last_id} primary {last_id}" in lines[2]
    age = float(re.search(r"; sync verified (\d+\.\d) s ago;", out).group(1))
    assert 2.5 <= age < 30
    assert f"redis://***@127.0.0.1:{setup.primary_server.port}/0" in out
    # The check brought the shared held index up to the confirmed mirror entry.
    confirmed = setup.local.hget(keys.MIRROR_CONFIRMED, SOURCE)
    assert setup.local.hget(keys.held_cursor(SOURCE), "m") == confirmed

    code, out, _ = run(capsys, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["sync"]["verified_ms"] == verified_ms and doc["sync"]["verified_age_s"] >= 2.5
    assert doc["sources"][0]["held_segments_compared"] == 2


def test_lost_writes_are_reported_as_exact_ranges(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades, primary_trades=without(trades, TAIL_LOSS))
    setup.lose_from_primary(MIDDLE_LOSS + SINGLE_LOSS)

    code, out, _ = run(capsys)
    assert code == 2, out
    assert out.startswith(f"SYNC-CHECK CRITICAL - {SOURCE}: {MISSING} trades missing from the primary "
                          "in 3 ranges;"), out
    shown = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in EXPECTED_RANGES)
    assert f"  missing: {shown}\n" in out
    assert "; sync has not verified yet;" in out

    code, out, _ = run(capsys, "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["status"] == "critical" and doc["exit_code"] == 2
    assert doc["sync"] == {"verified_ms": None, "verified_age_s": None}
    (source,) = doc["sources"]
    assert source["missing_ranges"] == EXPECTED_RANGES
    assert source["missing"] == MISSING and source["missing_ranges_total"] == 3
    assert (source["local_trades"], source["primary_trades"]) == (COUNT, COUNT - MISSING)
    assert source["duplicated"] == 0 and source["only_in_primary"] == 0
    assert source["lost_marked_applied"] == 0 and source["lost_marked_applied_ranges"] == []
    assert sum(m["local"] - m["primary"] for m in source["minutes_differing"]) == MISSING
    assert source["last_id"] == {"local": FIRST_ID + COUNT - 1, "primary": FIRST_ID + COUNT - 51}


def test_repair_adds_exactly_the_missing_trades(setup, capsys):
    trades = make_trades()
    lost = MIDDLE_LOSS + SINGLE_LOSS + TAIL_LOSS
    setup.write_like_the_writer(trades, primary_trades=without(trades, lost))
    assert run(capsys)[0] == 2

    code, out, err = run(capsys, "--repair")
    assert code == 0, out + err
    assert out.startswith(f"SYNC-CHECK OK - repaired {MISSING} trades; "), out
    assert f"repair: {SOURCE}: added {MISSING} of {MISSING} missing trades\n" in out
    counts = setup.primary_id_counts()
    assert sorted(counts) == [t.id for t in trades] and set(counts.values()) == {1}
    assert read_candles(setup.primary, SOURCE) == expected_candles(trades)
    assert int(setup.primary.hget(keys.last(SOURCE), "id")) == trades[-1].id
    repairs = setup.repair_events()
    assert len(repairs) == 1
    assert repairs[0]["fields"]["added"] == MISSING and repairs[0]["fields"]["source"] == SOURCE
    assert repairs[0]["proc"] == "sync-check"

    assert run(capsys)[0] == 0
    code, out, _ = run(capsys, "--repair", "--json")
    assert code == 0 and json.loads(out)["notes"] == ["nothing to repair"]
    assert len(setup.repair_events()) == 1
    assert set(setup.primary_id_counts().values()) == {1}


def test_repair_json_reports_before_and_after(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades, primary_trades=without(trades, TAIL_LOSS))
    code, out, _ = run(capsys, "--repair", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "ok" and doc["sources"][0]["missing"] == 0
    assert doc["repair"]["added"] == len(TAIL_LOSS) and doc["repair"]["not_repairable"] == []
    assert doc["repair"]["sources"] == [{"source": SOURCE, "missing": len(TAIL_LOSS), "added": len(TAIL_LOSS),
                                         "skipped": 0, "floored": 0, "not_held": 0}]
    assert doc["repair"]["before"]["sources"][0]["missing_ranges"] == [EXPECTED_RANGES[2]]


def test_entries_lost_although_marked_applied_are_critical_and_not_re_sent(setup, capsys):
    """The seen-set marks the trades applied, the stream lost them: no bitmap comparison sees it, and a
    re-send would be skipped (that is what keeps every trade exactly once): the audit reports it."""
    trades = make_trades()
    setup.write_like_the_writer(trades)
    setup.lose_from_primary(MIDDLE_LOSS, clear_seen=False)     # entries deleted, seen bits kept
    code, out, _ = run(capsys, "--json")
    assert code == 2, out
    doc = json.loads(out)
    source = doc["sources"][0]
    assert (source["missing"], source["lost_marked_applied"]) == (0, len(MIDDLE_LOSS))
    assert source["lost_marked_applied_ranges"] == [[MIDDLE_LOSS[0], MIDDLE_LOSS[-1]]]
    (reason,) = [r for r in doc["reasons"] if r["level"] == "critical"]
    assert "entries lost although marked applied" in reason["text"]
    assert "not repairable by re-sending" in reason["text"]

    code, out, _ = run(capsys, "--repair")
    assert code == 2, out
    assert out.startswith(f"SYNC-CHECK CRITICAL - {SOURCE}: {len(MIDDLE_LOSS)} entries lost although "
                          "marked applied"), out
    assert "nothing to repair" in out
    assert (f"not repairing {SOURCE}: {len(MIDDLE_LOSS)} entries lost although marked applied cannot be "
            "restored by re-sending") in out
    assert setup.primary_id_counts() == collections.Counter(t.id for t in without(trades, MIDDLE_LOSS))
    assert not setup.repair_events()


def test_failover_warns_and_repair_refuses(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades[:-len(TAIL_LOSS)])
    setup.set_writer_state("failover")
    setup.write_failover_copy(trades[-len(TAIL_LOSS):])

    code, out, _ = run(capsys)
    assert code == 1, out
    assert out.startswith("SYNC-CHECK WARNING - writer is in failover"), out
    assert f"missing: {TAIL_LOSS[0]}-{TAIL_LOSS[-1]}" in out

    code, out, _ = run(capsys, "--repair")
    assert code == 1, out
    assert "not repairing: the writer is in failover" in out
    assert setup.primary.xlen(keys.trades(SOURCE)) == COUNT - len(TAIL_LOSS)
    assert not setup.repair_events()


def test_the_failover_copy_is_compared_and_re_sent_after_the_hand_back(setup, capsys):
    """An outage's trades went to the failover copy and were replayed; the primary then lost the tail of
    that replay (its AOF) while the writer is back in primary state: only the comparison can tell."""
    trades = make_trades()
    setup.write_like_the_writer(trades[:2000])
    setup.write_failover_copy(trades[2000:])
    BatchApplier(setup.primary, RETENTION_MS, SOURCE).apply_trades(SOURCE, trades[2000:-40])
    code, out, _ = run(capsys, "--json")
    assert code == 2, out
    assert json.loads(out)["sources"][0]["missing_ranges"] == [[trades[-40].id, trades[-1].id]]
    code, out, _ = run(capsys, "--repair")
    assert code == 0, out
    assert "added 40 of 40 missing trades" in out
    assert setup.primary_id_counts() == collections.Counter(t.id for t in trades)


def test_repair_refuses_a_source_whose_epoch_the_local_side_does_not_know(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades, primary_trades=without(trades, TAIL_LOSS))
    setup.local.delete(keys.EPOCHS)
    code, out, _ = run(capsys, "--repair")
    assert code == 2, out
    (line,) = [line for line in out.splitlines() if "epoch" in line]
    assert line.startswith(f"repair: not repairing {SOURCE}: the local side knows no epoch"), out
    assert setup.primary.xlen(keys.trades(SOURCE)) == COUNT - len(TAIL_LOSS)
    assert not setup.repair_events()


def test_repair_respects_the_primarys_epoch(setup, capsys):
    """A primary that holds another epoch than the one this host verified may have lost btcfeed's data
    since: the apply script refuses the re-send rather than filling it with a part."""
    trades = make_trades()
    setup.write_like_the_writer(trades, primary_trades=without(trades, TAIL_LOSS))
    setup.primary.hset(keys.meta(SOURCE), "epoch", "another-host-reseeded")
    code, out, _ = run(capsys, "--repair")
    assert code == 2, out
    assert f"\nrepair failed: repair of {SOURCE}: epoch refused: BTCFEED-EPOCH" in out, out
    assert setup.primary.xlen(keys.trades(SOURCE)) == COUNT - len(TAIL_LOSS)
    failed = [e for e in recent_events(setup.local, 50) if e["event"] == "repair_failed"]
    assert len(failed) == 1 and "epoch refused" in failed[0]["fields"]["reason"]


def test_the_check_carries_on_from_syncs_held_index(setup, capsys, monkeypatch):
    """sync follows the local copy on its own; the check takes the index over wherever sync left it, and
    follows until it has caught up (here one mirrored batch per step)."""
    monkeypatch.setattr(synccheck, "FOLLOW_ENTRIES", 1)
    trades = make_trades()
    setup.write_like_the_writer(trades, primary_trades=without(trades, [trades[10].id, trades[-10].id]))
    HeldIndex(setup.local, SOURCE).follow(setup.local.hget(keys.MIRROR_CONFIRMED, SOURCE).decode(), 2)
    assert setup.local.hget(keys.held_cursor(SOURCE), "m") != setup.local.hget(keys.MIRROR_CONFIRMED, SOURCE)
    code, out, _ = run(capsys, "--json")
    assert code == 2
    assert json.loads(out)["sources"][0]["missing_ranges"] == [[trades[10].id] * 2, [trades[-10].id] * 2]


def test_duplicate_in_the_primary_is_critical(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades)
    twice = trades[1234]
    setup.primary.xadd(keys.trades(SOURCE), twice.fields())
    code, out, _ = run(capsys, "--json")
    assert code == 2
    source = json.loads(out)["sources"][0]
    assert (source["duplicated"], source["duplicated_ids"], source["missing"]) == (1, [twice.id], 0)


def test_a_batch_still_on_its_way_only_warns(setup, capsys):
    """The writer mirrored a batch that the primary has not confirmed yet: the comparison leaves it out
    (the held index stops at the confirmed entry), the audit shows it as settling."""
    trades = make_trades()
    setup.write_like_the_writer(trades)
    now = int(time.time() * 1000)
    fresh = [t._replace(ts=now - 50 + i, rts=now + i) for i, t in enumerate(make_trades(5, FIRST_ID + COUNT))]
    setup.write_like_the_writer(fresh, primary_trades=[], confirm=False)
    code, out, _ = run(capsys, "--json")
    assert code == 1, out
    source = json.loads(out)["sources"][0]
    assert (source["settling_missing"], source["missing"], source["missing_ranges"]) == (5, 0, [])


def test_trades_only_in_the_primary_are_not_a_problem(setup, capsys):
    trades = make_trades()
    setup.write_like_the_writer(trades[1000:], primary_trades=trades)     # a local copy started later
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


@pytest.mark.parametrize("variable, value, expected", [
    ("BTCFEED_PRIMARY_URL", f"http://:{PASSWORD}@example.com", "configuration error: BTCFEED_PRIMARY_URL"),
    ("BTCFEED_SOURCES", "binance:", "configuration error: BTCFEED_SOURCES"),
])
def test_bad_configuration_is_critical_exit_2(setup, capsys, monkeypatch, variable, value, expected):
    """Exit 2 for a wrong setting, as from every btcfeed command; the status line agrees with it."""
    monkeypatch.setenv(variable, value)
    code, out, _ = run(capsys)
    assert code == 2
    assert out.startswith("SYNC-CHECK CRITICAL - ") and expected in out, out
    assert len(out.strip().splitlines()) == 1, out
    code, out, _ = run(capsys, "--json")
    assert code == 2 and json.loads(out)["status"] == "critical" and json.loads(out)["exit_code"] == 2


def test_unreachable_local_redis_is_unknown(setup, capsys, monkeypatch):
    monkeypatch.setenv("BTCFEED_LOCAL_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, out, _ = run(capsys)
    assert code == 3
    assert out.startswith("SYNC-CHECK UNKNOWN - ") and "unreachable: ConnectionError" in out, out
    assert len(out.strip().splitlines()) == 2, out


def test_usage_error_is_unknown(setup, capsys):
    code, out, _ = run(capsys, "--fix-everything")
    assert code == 3 and out.startswith("SYNC-CHECK UNKNOWN - usage:")


def test_the_command_runs_from_anywhere(setup, tmp_path):
    setup.write_like_the_writer(make_trades())
    env = {k: v for k, v in os.environ.items()}
    done = subprocess.run([os.path.join(ROOT, "bin", "sync-check"), "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    doc = json.loads(done.stdout)
    assert doc["status"] == "ok" and doc["sources"][0]["local_trades"] == COUNT


def test_sync_check_imports_no_process():
    """A library module never imports a process; the writer's public names stay where they were."""
    probe = ("import sys, btcfeed.commands.synccheck; "
             "print(sorted(m for m in sys.modules if m.startswith(('btcfeed.processes', 'tools'))))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    from btcfeed.storage import writerstate
    from btcfeed.processes.writer import PRIMARY, describe_error, read_state, set_state
    assert (PRIMARY, describe_error, read_state, set_state) == (
        writerstate.PRIMARY, writerstate.describe_error, writerstate.read_state, writerstate.set_state)


def test_same_ids_with_different_trade_times_warn(setup, capsys):
    trades = make_trades()
    moved = trades[:]
    moved[100] = moved[100]._replace(ts=moved[100].ts - 5 * 60_000)
    setup.write_like_the_writer(trades, primary_trades=moved)
    code, out, _ = run(capsys, "--json")
    assert code == 1, out
    doc = json.loads(out)
    assert doc["sources"][0]["missing"] == 0 and doc["sources"][0]["minutes_differing_total"] == 2
    assert "different trade times" in doc["summary"]


def test_trades_older_than_the_primarys_window_are_not_compared(setup, capsys):
    trades = make_trades()
    day_old = make_trades(100, first_id=FIRST_ID - 1000,
                          end_ms=int(time.time() * 1000) - RETENTION_MS - 60_000)
    setup.write_like_the_writer(day_old + trades)
    # The primary's floor moved past them with its candles, and its retention trimmed their entries.
    assert int(setup.primary.hget(keys.meta(SOURCE), "floor")) > day_old[-1].id
    setup.lose_from_primary([t.id for t in day_old], clear_seen=False)
    code, out, _ = run(capsys, "--json")
    assert code == 0, out
    source = json.loads(out)["sources"][0]
    assert (source["local_trades"], source["missing"], source["lost_marked_applied"]) == (COUNT, 0, 0)
