"""`btcfeed primary move --to URL` against the real stack: the window copied into the new primary while
trades flow, a switch with no gap, nothing written to the old primary after it, the new primary kept
across restarts; a move whose command is killed is finished or abandoned by sync; misuse gives one line
and changes nothing."""

import json
import os
import shutil
import signal
import subprocess
import urllib.request

import pytest

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.events import recent_events
from btcfeed.storage.bus import read_heartbeats
from harness import (SOURCE, Cluster, drain, local_client, primary_last_id, remove_stack, short_tmpdir,
                     start_stack, verify_derived, verify_primary, wait_for, wait_verified, writer_state)
from tools import verify
from tools.redis_process import RedisProcess, free_port
from tools.tlscerts import make_test_pki, tls_server_args

pytestmark = pytest.mark.integration
RATE = 5000
SEED = 37
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


@pytest.fixture
def target():
    server = RedisProcess(short_tmpdir("bf-new-")).start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


def btcfeed(stack, *args, timeout: float = 180):
    return subprocess.run([os.path.join(ROOT, "bin", "btcfeed"), *args], env=stack.env, capture_output=True,
                          text=True, timeout=timeout)


def move_record(stack) -> dict:
    return {k.decode(): v.decode() for k, v in local_client(stack).hgetall(keys.MOVE).items()}


def events(stack) -> list:
    return [e["event"] for e in recent_events(local_client(stack), 500)]


def assert_moved_exactly(stack, sim, old, new_client) -> None:
    """Every trade of the window in the new primary exactly once; the old one untouched after the switch."""
    old_client = old.client()
    frozen = (old_client.xlen(keys.trades(SOURCE)), primary_last_id(old_client))
    wait_for(lambda: primary_last_id(new_client) > frozen[1] + RATE, 20, "live trades in the new primary")
    last = drain(new_client, sim)
    wait_verified(stack)
    first = verify.lowest_trade_id(old_client, SOURCE)
    verdict = verify_primary(new_client, sim, from_id=first)
    assert verdict.exact(), str(verdict)
    verify_derived(new_client, sim, first, last)
    assert (old_client.xlen(keys.trades(SOURCE)), primary_last_id(old_client)) == frozen


def test_move_to_a_new_primary_while_trades_flow(primary, sim, stack, target):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 3 * RATE, 30, "a few seconds of trades in the old primary")
    moved = btcfeed(stack, "primary", "move", "--to", target.url)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    print("\n" + moved.stdout.strip().splitlines()[-2])
    assert "moved to" in moved.stdout and "primary.toml" in moved.stdout
    assert writer_state(stack) == "primary"
    beats = read_heartbeats(local_client(stack), ["writer", "sync", "health"])
    assert {beats[name]["primary"] for name in beats} == {target.url}
    assert config_module.load(stack.env).primary_url == target.url      # what a restart uses
    assert_moved_exactly(stack, sim, primary, target.client())
    assert move_record(stack)["phase"] == "done"
    assert {"move_start", "primary_moved"} <= set(events(stack))
    with urllib.request.urlopen(f"http://{stack.env['BTCFEED_HEALTH_ADDR']}/status", timeout=10) as response:
        planned = json.loads(response.read())["planned"]
    assert planned["maintenance"] is None
    move = planned["move"]
    assert move["phase"] == "done" and move["to"] == target.url
    assert move["trades_copied"] > RATE and move["seconds"] > 0 and move["by"]


def test_a_killed_move_before_the_switch_is_abandoned_and_the_feed_stays(primary, sim, stack, target):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > RATE, 30, "trades in the old primary")
    command = subprocess.Popen([os.path.join(ROOT, "bin", "btcfeed"), "primary", "move", "--to", target.url],
                               env=stack.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: move_record(stack).get("phase") == "switching", 60, "the move to pause the writer")
    finally:
        command.send_signal(signal.SIGKILL)
        command.wait(10)
    wait_for(lambda: writer_state(stack) == "primary", 30, "sync to give the writer back to the old primary")
    assert move_record(stack)["phase"] == "abandoned" and "move_abandoned" in events(stack)
    assert not os.path.exists(os.path.join(stack.state_dir, "primary.toml"))
    before = primary_last_id(client)
    wait_for(lambda: primary_last_id(client) > before + RATE, 20, "live trades in the old primary again")
    # The new primary holds the half-run copy; moving there again adds each trade once, not twice.
    moved = btcfeed(stack, "primary", "move", "--to", target.url)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert_moved_exactly(stack, sim, primary, target.client())


def test_a_new_primary_that_forgets_right_after_the_move_is_refilled(primary, sim, stack, target):
    """A silent loss on the new primary (FLUSHALL, no error to anyone) just after the switch: the epoch
    the move recorded is gone with it, so the writer's next batch is refused and sync re-seeds it."""
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the old primary")
    moved = btcfeed(stack, "primary", "move", "--to", target.url)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    new_client = target.client()
    new_client.flushall()
    wait_for(lambda: "reseed_done" in events(stack), 60, "sync to re-seed the new primary")
    assert_moved_exactly(stack, sim, primary, new_client)


def test_a_move_survives_a_writer_and_sync_killed_while_it_copies(primary, sim, stack, target):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the old primary")
    command = subprocess.Popen([os.path.join(ROOT, "bin", "btcfeed"), "primary", "move", "--to", target.url],
                               env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: move_record(stack).get("phase") in ("copying", "switching"), 30, "the move to start")
    for name in ("writer", "sync"):
        stack.kill(name)
    output, _ = command.communicate(timeout=180)
    assert command.returncode == 0, output
    assert writer_state(stack) == "primary"
    assert_moved_exactly(stack, sim, primary, target.client())


def test_move_misuse_is_one_line_and_changes_nothing(primary, sim, stack):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 0, 30, "trades in the primary")
    replica = RedisProcess(short_tmpdir("bf-replica-"),
                           extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    try:
        cases = [
            (("--to", f"redis://127.0.0.1:{free_port()}/0"), "does not take writes"),
            (("--to", replica.url), "replica"),
            (("--to", primary.url), "the primary the feed uses now"),
            (("--to", "http://example.com"), "not a Redis URL"),
            ((), "--to URL"),
            (("--abort",), "no move is under way"),
        ]
        for args, message in cases:
            done = btcfeed(stack, "primary", "move", *args, timeout=60)
            assert done.returncode != 0, (args, done.stdout)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, \
                (args, done.stderr)
        local = local_client(stack)
        local.hset(keys.MOVE, mapping={"phase": "copying", "to": "redis://elsewhere:6379/0",
                                       "pid": os.getpid(), "host": os.uname().nodename})
        busy = btcfeed(stack, "primary", "move", "--to", replica.url, timeout=60)
        assert busy.returncode != 0 and "under way" in busy.stderr, busy.stderr
        local.delete(keys.MOVE)
        assert writer_state(stack) == "primary"
        assert not os.path.exists(os.path.join(stack.state_dir, "primary.toml"))
        assert "move_start" not in events(stack)
    finally:
        replica.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make certificates")
def test_move_to_a_tls_primary(primary, sim, stack):
    certs = make_test_pki(short_tmpdir("bf-certs-"))
    tls_port = free_port()
    server = RedisProcess(short_tmpdir("bf-tls-"), extra_args=tls_server_args(certs, tls_port)).start()
    try:
        client = primary.client()
        wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the old primary")
        url = f"rediss://127.0.0.1:{tls_port}/0"
        moved = btcfeed(stack, "primary", "move", "--to", url, "--tls-ca-file", f"{certs}/ca.crt")
        assert moved.returncode == 0, moved.stdout + moved.stderr
        restarted = config_module.load(stack.env)
        assert (restarted.primary_url, restarted.primary_tls_ca_file) == (url, f"{certs}/ca.crt")
        assert_moved_exactly(stack, sim, primary, server.client())
    finally:
        server.stop()


def test_move_to_a_cluster(primary, sim):
    cluster = Cluster()
    stack = start_stack(primary, sim, BTCFEED_COMPAT_KEYS="false")
    try:
        client = primary.client()
        wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the old primary")
        moved = btcfeed(stack, "primary", "move", "--to", cluster.url)
        assert moved.returncode == 0, moved.stdout + moved.stderr
        assert_moved_exactly(stack, sim, primary, cluster.client())
    finally:
        remove_stack(stack)
        cluster.close()
