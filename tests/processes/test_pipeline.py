"""The supervised stack against the exchange simulator and a real primary: every trade exactly once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from btcfeed import keys
from btcfeed.commands.stack import PROGRAMS
from harness import (SOURCE, drain, primary_last_id, remove_stack, short_tmpdir, start_stack,
                     verify_derived, verify_primary, wait_for)

pytestmark = pytest.mark.integration
RATE = 2000


def run_and_verify(primary_client, sim, stack=None, expect_from=None):
    last_id = drain(primary_client, sim)
    verdict = verify_primary(primary_client, sim, from_id=expect_from)
    assert verdict.exact(), str(verdict)
    assert verdict.present == verdict.expected > 0
    first = expect_from if expect_from is not None else min(
        int(f[b"id"]) for _, f in primary_client.xrange(keys.trades(SOURCE), count=1))
    verify_derived(primary_client, sim, first, last_id)
    return verdict


def wait_trades(primary_client, count):
    # On an empty primary, count from its first trade (not from -1, which the first trade passes).
    start = primary_last_id(primary_client)
    if start < 0:
        start = wait_for(lambda: primary_last_id(primary_client) + 1, 20, "a first trade in the primary") - 1
    wait_for(lambda: primary_last_id(primary_client) >= start + count, 20,
             f"{count} more trades in the primary")


def test_every_trade_lands_exactly_once(primary, primary_client, sim):
    stack = start_stack(primary, sim)
    try:
        wait_trades(primary_client, 5 * RATE)
        verdict = run_and_verify(primary_client, sim)
        assert verdict.expected >= 5 * RATE
        assert {p["name"]: p["statename"] for p in stack.processes()} == {
            name: "RUNNING" for name in PROGRAMS}
        # The check itself must be able to fail: damage the primary and look again.
        stack.stop("writer")
        entries = primary_client.xrange(keys.trades(SOURCE), count=2)
        primary_client.xdel(keys.trades(SOURCE), entries[1][0])
        primary_client.xadd(keys.trades(SOURCE), entries[0][1])
        damaged = verify_primary(primary_client, sim)
        assert damaged.missing == [int(entries[1][1][b"id"])]
        assert damaged.duplicated == [int(entries[0][1][b"id"])]
    finally:
        remove_stack(stack)


def test_raw_stream_form(primary, primary_client, sim):
    stack = start_stack(primary, sim, BTCFEED_BINANCE_STREAM_FORM="raw")
    try:
        wait_trades(primary_client, RATE)
        run_and_verify(primary_client, sim)
    finally:
        remove_stack(stack)


@pytest.mark.parametrize("victim", ["ingest", "writer"])
def test_sigkill_mid_run_loses_and_duplicates_nothing(primary, primary_client, sim, victim):
    stack = start_stack(primary, sim)
    try:
        wait_trades(primary_client, RATE)
        old_pid = stack.kill(victim, signal.SIGKILL)

        def restarted():
            info = stack.info(victim)
            return info["statename"] == "RUNNING" and info["pid"] != old_pid

        wait_for(restarted, 20, f"supervisord to restart {victim}")
        wait_trades(primary_client, 2 * RATE)
        run_and_verify(primary_client, sim)
    finally:
        remove_stack(stack)


def test_repeated_kills_of_both(primary, primary_client, sim):
    stack = start_stack(primary, sim)
    try:
        for round_ in range(3):
            wait_trades(primary_client, RATE // 2)
            for victim in ("writer", "ingest"):
                old_pid = stack.kill(victim, signal.SIGKILL)
                wait_for(lambda: stack.info(victim)["pid"] not in (0, old_pid), 20, f"{victim} restarted")
        wait_trades(primary_client, RATE)
        run_and_verify(primary_client, sim)
    finally:
        remove_stack(stack)


@pytest.mark.parametrize("fault", ["drop", "cut", "stall"])
def test_websocket_fault_mid_run_is_backfilled(primary, primary_client, sim, fault):
    stack = start_stack(primary, sim)
    try:
        wait_trades(primary_client, RATE)
        params = {"seconds": 2} if fault == "stall" else {}
        sim.client.fault(fault, **params)
        time.sleep(2.5)
        wait_trades(primary_client, RATE)
        run_and_verify(primary_client, sim)
        log = open(stack.log_path("ingest")).read()
        expected_event = "event=gap" if fault == "stall" else "event=connection_lost"
        assert expected_event in log
        assert "event=backfilled" in log
    finally:
        remove_stack(stack)


def test_ingest_restart_backfills_what_the_exchange_printed_meanwhile(primary, primary_client, sim):
    stack = start_stack(primary, sim)
    try:
        wait_trades(primary_client, RATE)
        stack.stop("ingest")
        time.sleep(3)     # about 6,000 trades printed while nobody listens
        stack.start("ingest")
        wait_trades(primary_client, RATE)
        run_and_verify(primary_client, sim)
        assert "event=backfilled" in open(stack.log_path("ingest")).read()
    finally:
        remove_stack(stack)


def test_proactive_reconnect_overlaps_without_gap(primary, primary_client, sim):
    # 0.001 h = 3.6 s: the connection is replaced (new one first) several times in this run.
    stack = start_stack(primary, sim, BTCFEED_MAX_CONN_HOURS="0.001")
    try:
        time.sleep(9)
        run_and_verify(primary_client, sim)
        log = open(stack.log_path("ingest")).read()
        assert log.count("event=proactive_reconnect") >= 2
        # The replaced connection is closed on purpose: that is not a lost connection, and its
        # last bytes are not mistaken for a bad message.
        assert "event=connection_lost" not in log
        local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock")
        assert local.xlen(keys.DEADLETTER) == 0
    finally:
        remove_stack(stack)


def test_two_stacks_side_by_side_into_one_primary(primary, primary_client, sim):
    first = start_stack(primary, sim)
    second = start_stack(primary, sim)
    try:
        assert first.state_dir != second.state_dir
        wait_trades(primary_client, 2 * RATE)
        second.kill("ingest", signal.SIGKILL)
        wait_trades(primary_client, RATE)
        run_and_verify(primary_client, sim)
    finally:
        remove_stack(first)
        remove_stack(second)


def run_process_main(module, **env):
    full_env = {**os.environ, "BTCFEED_STATE_DIR": short_tmpdir(), **env}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return subprocess.run([sys.executable, "-m", module], env=full_env, capture_output=True, text=True,
                          timeout=60, cwd=root)


@pytest.mark.parametrize("variable, value, needle", [
    ("BTCFEED_SOURCES", "foo:BTCUSDT", "unknown exchange 'foo'"),
    ("BTCFEED_PRIMARY_URL", "http://user:hunter2@example.com", "is not a Redis URL"),
    ("BTCFEED_BINANCE_WS_URL", "wss://stream.binance.com:9443/ws", "without a path"),
])
def test_bad_configuration_is_one_clear_line(variable, value, needle):
    for module in ("btcfeed.processes.ingest", "btcfeed.processes.writer", "btcfeed.processes.health"):
        result = run_process_main(module, **{variable: value})
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert "Traceback" not in result.stderr and "hunter2" not in result.stderr


def test_unreachable_local_redis_at_start_is_one_clear_line():
    result = run_process_main("btcfeed.processes.writer",
                              BTCFEED_LOCAL_URL="unix:///tmp/no-such-dir/redis.sock")
    assert result.returncode == 1
    assert "local_redis_unreachable" in result.stdout and "Traceback" not in result.stdout + result.stderr
