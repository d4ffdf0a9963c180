"""deployment/primary-acl.conf against a real redis-server: the whole stack runs under the recipe's
`btcfeed` user (live writes, a primary SIGKILL with failover, replay and re-seed, bin/sync-check) with
every trade exactly once and not one command refused; and the recipe refuses what it must."""

import glob
import hashlib
import json
import os
import random
import shutil
import subprocess
import time

import pytest
import redis

from btcfeed import keys
from btcfeed.storage.antientropy import ids_of
from btcfeed.storage.apply import BatchApplier
from btcfeed.trade import Trade, encode_batch
from tools.redis_process import RedisProcess
from harness import (Simulator, drain, primary_last_id, remove_stack, short_tmpdir, start_stack,
                     verify_primary, wait_for)

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "deployment", "primary-acl.conf")
SOURCE = "binance:BTCUSDT"
BTCFEED_PASSWORD = "btcfeed-Acl-7f3e9c2a51d84b06"
READER_PASSWORD = "reader-Acl-0c6d2e8b4f1a9357"
RATE = 1000


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def acl_file_from_recipe(path: str) -> None:
    """The recipe as an operator installs it: comments stripped, password hashes filled in, plus an
    administrator (here the default user, loopback only) for the test's own checks."""
    with open(RECIPE) as handle:
        lines = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    assert [line.split()[1] for line in lines] == ["btcfeed", "reader"], lines
    text = "\n".join(lines).replace("BTCFEED_PASSWORD_SHA256", sha256(BTCFEED_PASSWORD)) \
                           .replace("READER_PASSWORD_SHA256", sha256(READER_PASSWORD))
    with open(path, "w") as handle:
        handle.write("user default on nopass ~* &* +@all\n" + text + "\n")


@pytest.fixture
def acl_primary():
    """A primary whose users come from an ACL file, so they survive a SIGKILL and restart."""
    directory = short_tmpdir("bf-aclprimary-")
    acl_path = os.path.join(directory, "users.acl")
    acl_file_from_recipe(acl_path)
    server = RedisProcess(directory, extra_args=["--aclfile", acl_path]).start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def user_client(server: RedisProcess, user: str, password: str, **kwargs) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, username=user, password=password, socket_timeout=5,
                       **kwargs)


def acl_denials(admin: redis.Redis) -> list:
    """The server's record of refused commands, keys and channels (any user)."""
    return admin.acl_log(count=100)


def test_recipe_denies_what_it_must(acl_primary):
    admin = acl_primary.client()
    feed = user_client(acl_primary, "btcfeed", BTCFEED_PASSWORD)
    reader = user_client(acl_primary, "reader", READER_PASSWORD)
    try:
        # Sanity: the users exist, need their passwords, and the feed user can do its own work.
        with pytest.raises(redis.AuthenticationError):
            user_client(acl_primary, "btcfeed", "wrong-password").ping()
        assert feed.ping() and reader.ping()
        assert feed.set(keys.PROBE, 1, px=10_000)
        feed.xadd(keys.trades(SOURCE), {"id": 1, "p": "1", "q": "1", "side": "buy", "ts": 1, "rts": 1})

        denied_for_feed = [
            ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "maxmemory", "1"), ("CONFIG", "GET", "*"),
            ("KEYS", "*"), ("SCAN", "0"), ("DEL", keys.trades(SOURCE)), ("UNLINK", keys.last(SOURCE)),
            ("SHUTDOWN", "NOSAVE"), ("SAVE",), ("SWAPDB", 0, 1), ("SCRIPT", "FLUSH"), ("ACL", "LIST"),
            ("REPLICAOF", "NO", "ONE"),
            ("SET", "someone:else", "x"), ("GET", "someone:else"), ("XADD", "orders", "*", "a", "1"),
            # the probe key is write-only
            ("GET", keys.PROBE),
            ("PUBLISH", "other-channel", "x"), ("FUNCTION", "FLUSH"), ("CLIENT", "KILL", "TYPE", "normal"),
        ]
        for command in denied_for_feed:
            with pytest.raises(redis.exceptions.NoPermissionError):
                feed.execute_command(*command)
        # Scripts run with the caller's permissions: a script cannot step outside the key list, nor
        # call a command the user lacks.
        with pytest.raises(redis.ResponseError, match="can't access|no permissions"):
            feed.eval("return redis.call('SET', 'someone:else', 'x')", 0)
        with pytest.raises(redis.ResponseError, match="can't run this command|no permissions"):
            feed.eval("return redis.call('FLUSHALL')", 0)
        assert admin.get("someone:else") is None and admin.exists(keys.trades(SOURCE))

        # The reader reads the data contract and the channels, and writes nothing.
        assert len(reader.xrange(keys.trades(SOURCE))) == 1
        assert reader.hgetall(keys.last(SOURCE)) == {}
        assert reader.get(keys.COMPAT_LAST_PRICE) is None
        pubsub = reader.pubsub()
        pubsub.subscribe(keys.live_channel(SOURCE), keys.COMPAT_CHANNEL)
        pubsub.psubscribe("btcfeed:{*}:live")
        pubsub.close()
        for command in [("SET", keys.COMPAT_LAST_PRICE, "1"), ("XADD", keys.trades(SOURCE), "*", "id", "2"),
                        ("DEL", keys.trades(SOURCE)), ("GETBIT", keys.seen_segment(SOURCE, 1), 1),
                        ("SET", keys.PROBE, "1"), ("PUBLISH", keys.COMPAT_CHANNEL, "1"), ("KEYS", "*"),
                        ("EVAL", "return 1", 0), ("FLUSHALL",), ("CONFIG", "GET", "*")]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                reader.execute_command(*command)
        other = reader.pubsub()
        with pytest.raises(redis.exceptions.NoPermissionError):
            other.subscribe("other-channel")
            other.get_message(timeout=1)
        other.close()
    finally:
        for client in (admin, feed, reader):
            client.close()


def test_an_acl_from_before_setrange_still_applies_every_trade_with_the_same_seen_bits(acl_primary):
    """The seen-set is written with SETRANGE; a primary still on the recipe from before it was listed
    refuses that command, and the script sets the same bits with BITFIELD instead of failing the
    batch (which would fail the writer over for an ACL line)."""
    admin = acl_primary.client()
    feed = user_client(acl_primary, "btcfeed", BTCFEED_PASSWORD)
    try:
        admin.execute_command("ACL", "SETUSER", "btcfeed", "-setrange")      # the recipe as it was
        admin.acl_log_reset()
        admin.hset(keys.meta(SOURCE), "epoch", "e1")
        applier = BatchApplier(feed, retention_ms=24 * 3600 * 1000, compat_source=SOURCE,
                               epochs={SOURCE: "e1"})
        ids = sorted(random.Random(7).sample(range(60_000, 200_000), 3000))
        trades = [Trade(i, "60000.%02d" % (i % 100), "0.001", "buy", int(time.time() * 1000), 0) for i in ids]
        assert applier.apply_trades(SOURCE, trades[:2000]) == [2000, 0, 0]
        assert applier.apply_trades(SOURCE, trades[1000:]) == [1000, 1000, 0]
        assert applier.apply_trades(SOURCE, trades) == [0, 3000, 0]
        assert any(entry["object"] == "setrange" for entry in admin.acl_log(count=10))   # the fallback ran
        for number in {i >> keys.SEEN_SEGMENT_BITS for i in ids}:
            held = admin.get(keys.seen_prefix(SOURCE) + str(number))
            assert ids_of(number, held) == [i for i in ids if i >> keys.SEEN_SEGMENT_BITS == number]
        assert admin.xlen(keys.trades(SOURCE)) == 3000
        # The writer's and the replay's path (pipelined, errors in place) falls back the same way.
        writer_side = BatchApplier(feed, retention_ms=24 * 3600 * 1000, compat_source=SOURCE,
                                   epochs={SOURCE: "e1"})
        now = int(time.time() * 1000)
        more = [Trade(i, "60001.00", "0.002", "sell", now, 0) for i in range(300_000, 300_050)]
        assert writer_side.apply_many([(SOURCE, encode_batch(more[:20])), (SOURCE, encode_batch(more))],
                                      raise_on_error=False) == [[20, 0, 0], [30, 20, 0]]
        assert writer_side.seen_writes == "bitfield" and admin.xlen(keys.trades(SOURCE)) == 3050
    finally:
        admin.close()
        feed.close()


def sync_check(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(ROOT, "bin", "sync-check"), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_stack_runs_under_the_recipe_user(acl_primary):
    admin = acl_primary.client()
    assert admin.acl_whoami() == "default"
    admin.acl_log_reset()
    sim = Simulator(rate=RATE)
    url = f"redis://btcfeed:{BTCFEED_PASSWORD}@127.0.0.1:{acl_primary.port}/0"
    stack = start_stack(acl_primary, sim, BTCFEED_PRIMARY_URL=url)
    try:
        wait_for(lambda: primary_last_id(admin) >= 0, 20, "the first trade in the primary")
        time.sleep(2)
        verdict = verify_primary(admin, sim)
        assert verdict.present > 0 and not verdict.duplicated, str(verdict)
        assert acl_denials(admin) == [], acl_denials(admin)[:3]
        # The compatibility keys and the last hash were written through the script under the ACL user.
        assert admin.get(keys.COMPAT_LAST_PRICE) and admin.hget(keys.last(SOURCE), "id")
        assert admin.hget(keys.PRICE, "source") == SOURCE.encode()      # the price view, beside the script

        # Failover and replay: the user is in the ACL file, so it is back after the restart.
        before = primary_last_id(admin)
        acl_primary.kill()
        time.sleep(2)
        acl_primary.start()
        admin.close()
        admin = acl_primary.client()
        assert "btcfeed" in admin.acl_users()
        last_id = drain(admin, sim, timeout_s=40)
        assert last_id > before
        verdict = verify_primary(admin, sim)
        assert verdict.exact(), str(verdict)
        assert verdict.present == verdict.expected > 0

        # bin/sync-check under the same user: OK once sync has handed the writer back.
        deadline = time.monotonic() + 20
        while True:
            done = sync_check(stack.env)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
        report = json.loads(done.stdout)
        assert report["status"] == "ok" and report["sources"][0]["missing"] == 0

        # bin/sync-check --repair under the same user: a trade removed from the primary (entry and
        # seen bit, by the administrator) is put back through the apply script. sync is stopped
        # meanwhile: its anti-entropy would refill the hole too, and on a slow machine before the
        # command had started.
        stack.stop("sync")
        entry_id, fields = admin.xrange(keys.trades(SOURCE), count=1)[0]
        hole = int(fields[b"id"])
        admin.xdel(keys.trades(SOURCE), entry_id)
        admin.setbit(keys.seen_segment(SOURCE, hole), hole % 65536, 0)
        done = subprocess.run([os.path.join(ROOT, "bin", "sync-check"), "--repair", "--json"], cwd=ROOT,
                              env=stack.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
        assert json.loads(done.stdout)["repair"]["added"] == 1
        assert verify_primary(admin, sim).exact()
        stack.start("sync")

        # The fault really took the failover path: failover, re-seed (new run_id), drain and hand-back,
        # all under the ACL user.
        local = redis.Redis(unix_socket_path=os.path.join(stack.state_dir, "redis.sock"), socket_timeout=5)
        events = [fields[b"event"].decode() for _, fields in local.xrange(keys.EVENTS)]
        local.close()
        assert {"failover", "reseed_done", "drain_start", "hand_back"} <= set(events), events

        denials = acl_denials(admin)
        assert denials == [], denials[:3]
        noperm = []
        for path in glob.glob(os.path.join(stack.state_dir, "logs", "*.log")):
            with open(path, errors="replace") as handle:
                noperm += [f"{os.path.basename(path)}: {line.strip()}" for line in handle if "NOPERM" in line
                           or "NoPermission" in line]
        assert noperm == [], noperm[:5]
    finally:
        remove_stack(stack)
        sim.stop()
        admin.close()
