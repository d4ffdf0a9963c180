"""Upgrading btcfeed with the feed on: the whole stack stopped while the exchange goes on printing and
started again (`bin/btcfeed down` ... `bin/btcfeed up`), two feed hosts upgraded one at a time, and a
host crash (supervisord and every child SIGKILLed) followed by `up`: every trade exactly once in the
primary, compared id by id with the exchange's history.

`bin/btcfeed upgrade-check` against real stacks: go on a healthy one, no-go while the primary is paused,
no-go on a local Redis written by a newer data format, a configuration error in one line."""

import json
import os
import subprocess
import time

import pytest

from btcfeed import keys
from btcfeed.storage import schema
from harness import (SOURCE, drain, gap_records, kill_host, local_client, primary_last_id, remove_stack,
                     start_stack,
                     verify_derived, verify_primary, wait_for, wait_verified)
from tools import verify

pytestmark = pytest.mark.integration
RATE = 1000
SEED = 41
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def btcfeed(stack, *args, env=None, timeout=120):
    return subprocess.run([os.path.join(ROOT, "bin", "btcfeed"), *args], env={**stack.env, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def primary_trade_count(client, source: str = SOURCE) -> int:
    return client.xlen(keys.trades(source))


def wait_filled(client, stack, first: int, beyond: int, timeout_s: float) -> None:
    """Until the primary holds every id from `first` to past `beyond` (live trades after the stop are
    there, and the backfill of the stop is done): as many entries as ids, nothing still to fill."""
    def filled():
        last = primary_last_id(client)
        return (last > beyond and gap_records(stack, SOURCE) == 0
                and primary_trade_count(client) == last - first + 1)
    wait_for(filled, timeout_s, f"the primary to hold every trade from {first} past {beyond}", interval_s=0.2)


def assert_exact_from(client, sim, first: int) -> None:
    last = drain(client, sim)
    verdict = verify_primary(client, sim, from_id=first)
    assert verdict.exact(), str(verdict)
    assert verdict.present == verdict.expected == last - first + 1
    verify_derived(client, sim, first, last)


# --- one host: down, the exchange goes on, up ---------------------------------------------------------

@pytest.mark.parametrize("stop_s", [15, pytest.param(60, marks=pytest.mark.slow)])
def test_stack_stopped_while_the_exchange_goes_on_then_started_loses_nothing(primary, sim, stop_s):
    stack = start_stack(primary, sim)
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the primary")
        first = verify.lowest_trade_id(client, SOURCE)
        stopped = btcfeed(stack, "down")
        assert stopped.returncode == 0 and "down" in stopped.stdout, stopped.stdout + stopped.stderr
        assert stack.supervisord_pid() is None
        frozen = primary_last_id(client)
        at_stop = sim.client.status()["last_id"]
        time.sleep(stop_s)
        # Nothing wrote the primary meanwhile; the exchange printed on.
        assert primary_last_id(client) == frozen
        at_up = sim.client.status()["last_id"]
        assert at_up - at_stop > 0.8 * RATE * stop_s
        started = time.monotonic()
        upped = btcfeed(stack, "up")
        assert upped.returncode == 0 and "up" in upped.stdout, upped.stdout + upped.stderr
        up_s = time.monotonic() - started
        wait_filled(client, stack, first, at_up, timeout_s=60 + stop_s)
        print(f"\n{stop_s}s stop at {RATE} trades/s ({at_up - frozen} trades missed): `up` took {up_s:.1f}s, "
              f"the gap was filled {time.monotonic() - started:.1f}s after `up` was run")
        assert_exact_from(client, sim, first)
    finally:
        remove_stack(stack)


# --- one host: a crash (everything SIGKILLed), then up ------------------------------------------------

def test_host_crash_then_up_loses_and_duplicates_nothing(primary, sim):
    stack = start_stack(primary, sim)
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the primary")
        first = verify.lowest_trade_id(client, SOURCE)
        kill_host(stack)
        frozen = primary_last_id(client)
        time.sleep(5)
        assert primary_last_id(client) == frozen
        at_up = sim.client.status()["last_id"]
        upped = btcfeed(stack, "up")
        assert upped.returncode == 0, upped.stdout + upped.stderr
        wait_filled(client, stack, first, at_up, timeout_s=60)
        assert_exact_from(client, sim, first)
    finally:
        remove_stack(stack)


# --- two hosts, upgraded one at a time -----------------------------------------------------------------

def test_two_hosts_upgraded_one_at_a_time_leave_no_gap(primary, sim):
    hosts = [start_stack(primary, sim), start_stack(primary, sim)]
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > 2 * RATE, 30, "trades in the primary")
        first = verify.lowest_trade_id(client, SOURCE)
        for upgraded, other in (hosts, hosts[::-1]):
            checked = btcfeed(upgraded, "upgrade-check")
            assert checked.returncode in (0, 1), checked.stdout + checked.stderr
            assert btcfeed(upgraded, "down").returncode == 0
            # The other host carries the feed alone: the primary goes on without a stall.
            before = primary_last_id(client)
            for _ in range(5):
                mark = primary_last_id(client)
                wait_for(lambda: primary_last_id(client) > mark + RATE // 2, 5,
                         "the other host to go on writing the primary")
                time.sleep(1)
            assert primary_last_id(client) > before + 3 * RATE
            assert btcfeed(upgraded, "up").returncode == 0
            # Back means: its writer applies to the primary, its backfill of the stop is done, and sync
            # has verified its local copy against the primary.
            wait_for(lambda: json.loads(local_client(upgraded).get(keys.heartbeat("writer")) or "{}")
                     .get("batches", 0) > 0, 30, "the upgraded host's writer to write")
            wait_for(lambda: gap_records(upgraded, SOURCE) == 0, 60, "the upgraded host's backfill")
            wait_verified(upgraded, 60)
            wait_verified(other, 60)
        assert_exact_from(client, sim, first)
    finally:
        for stack in hosts:
            remove_stack(stack)


# --- upgrade-check against a real stack ------------------------------------------------------------------

@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


def checks_of(result) -> dict:
    return {check["name"]: check for check in json.loads(result.stdout)["checks"]}


def test_upgrade_check_says_go_on_a_healthy_stack(primary, sim, stack):
    wait_for(lambda: primary_last_id(primary.client()) > RATE, 30, "trades in the primary")
    wait_verified(stack, 30)
    result = btcfeed(stack, "upgrade-check")
    print("\n" + result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("upgrade-check: GO"), result.stdout
    for name in ("config", "stack", "schema", "writer", "sync", "bus", f"backfill {SOURCE}", "hosts"):
        assert any(f" {name}:" in line for line in lines), (name, result.stdout)
    as_json = btcfeed(stack, "upgrade-check", "--json")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert document["verdict"] == "go" and document["exit_code"] == 0
    checks = checks_of(as_json)
    assert all(check["status"] == "ok" for check in checks.values()), checks
    assert checks["schema"]["found"] == schema.VERSION
    assert "fromId" in checks[f"backfill {SOURCE}"]["detail"]


def test_upgrade_check_is_no_go_while_the_primary_is_paused(primary, sim, stack):
    wait_for(lambda: primary_last_id(primary.client()) > RATE, 30, "trades in the primary")
    assert btcfeed(stack, "primary", "pause", "--reason", "resize").returncode == 0
    wait_for(lambda: local_client(stack).xlen(keys.BACKLOG) > 0, 10, "batches in the backlog")
    result = btcfeed(stack, "upgrade-check", "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    checks = checks_of(result)
    assert checks["writer"]["status"] == "fail" and "maintenance" in checks["writer"]["detail"]
    assert json.loads(result.stdout)["verdict"] == "no-go"
    assert btcfeed(stack, "primary", "resume").returncode == 0
    wait_verified(stack, 30)
    again = btcfeed(stack, "upgrade-check")
    assert again.returncode == 0, again.stdout + again.stderr


def test_upgrade_check_is_no_go_on_a_newer_data_format_and_the_writer_refuses_it(primary, sim, stack):
    wait_for(lambda: primary_last_id(primary.client()) > RATE, 30, "trades in the primary")
    local = local_client(stack)
    assert int(local.get(keys.SCHEMA)) == schema.VERSION
    local.set(keys.SCHEMA, schema.VERSION + 1)
    result = btcfeed(stack, "upgrade-check", "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert checks_of(result)["schema"]["status"] == "fail"
    # A writer started on it stops with one line in its log instead of reading data it does not know.
    stack.kill("writer")
    wait_for(lambda: "newer btcfeed" in open(stack.log_path("writer")).read().split("writer_ready")[-1], 30,
             "the writer to refuse the newer data format")
    frozen = primary_last_id(primary.client())
    time.sleep(2)
    assert primary_last_id(primary.client()) == frozen
    local.set(keys.SCHEMA, schema.VERSION)


def test_upgrade_check_reads_a_stopped_stack_from_its_data_on_disk(primary, sim, stack):
    wait_for(lambda: primary_last_id(primary.client()) > RATE, 30, "trades in the primary")
    wait_verified(stack, 30)
    assert btcfeed(stack, "down").returncode == 0
    result = btcfeed(stack, "upgrade-check", "--json")
    print("\n" + btcfeed(stack, "upgrade-check").stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = checks_of(result)
    assert "stopped" in checks["stack"]["detail"]
    assert checks["schema"]["found"] == schema.VERSION and checks["writer"]["status"] == "ok"
    # The state dir's own files are untouched: the check read a copy.
    assert not os.path.exists(os.path.join(stack.state_dir, "redis.sock"))


def test_upgrade_check_with_a_configuration_error_is_one_line_and_exit_2(primary, sim, stack):
    result = btcfeed(stack, "upgrade-check", env={"BTCFEED_SOURCES": "nosuchexchange:BTC"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "configuration" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
