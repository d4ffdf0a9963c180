"""Planned maintenance of the primary against the real stack: pause, trades kept locally, resume, exact."""

import os
import subprocess
import time

import pytest

from btcfeed import keys
from btcfeed.events import recent_events
from harness import (SOURCE, primary_last_id, remove_stack, start_stack, verify_derived, verify_primary,
                     wait_for, wait_verified, drain, local_client, writer_state)
from tools import verify

pytestmark = pytest.mark.integration
RATE = 1000
SEED = 31
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


def btcfeed(stack, *args):
    return subprocess.run([os.path.join(ROOT, "bin", "btcfeed"), *args], env=stack.env, capture_output=True,
                          text=True, timeout=120)


def test_pause_keeps_trades_locally_and_resume_lands_them_exactly_once(primary, sim, stack):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 0, 20, "trades in the primary")
    first = verify.lowest_trade_id(client, SOURCE)
    asked = time.monotonic()
    paused = btcfeed(stack, "primary", "pause", "--reason", "resize the instance")
    assert paused.returncode == 0 and "paused" in paused.stdout, paused.stdout + paused.stderr
    local = local_client(stack)
    wait_for(lambda: local.xlen(keys.BACKLOG) > 0, 10, "batches kept in the backlog")
    print(f"\npause -> first batch on the local copy {time.monotonic() - asked:.3f}s")
    frozen = primary_last_id(client)
    time.sleep(3)
    assert primary_last_id(client) == frozen                  # nothing written to the primary meanwhile
    again = btcfeed(stack, "primary", "pause")
    assert again.returncode == 0 and "already paused" in again.stdout
    assert writer_state(stack) == "maintenance"
    health = subprocess.run([os.path.join(ROOT, "bin", "health")], env=stack.env, capture_output=True,
                            text=True, timeout=60)
    assert health.returncode == 1 and "resize the instance" in health.stdout, health.stdout
    resumed_at = time.monotonic()
    resumed = btcfeed(stack, "primary", "resume")
    assert resumed.returncode == 0 and "back on the primary" in resumed.stdout, \
        resumed.stdout + resumed.stderr
    print(f"resume -> hand-back {time.monotonic() - resumed_at:.3f}s")
    assert primary_last_id(client) > frozen
    last = drain(client, sim)
    wait_verified(stack)
    verdict = verify_primary(client, sim, from_id=first)
    assert verdict.exact(), str(verdict)
    verify_derived(client, sim, first, last)
    names = [e["event"] for e in recent_events(local, 100)]
    assert "maintenance_start" in names and "maintenance_end" in names


def test_resume_without_pause_changes_nothing(primary, sim, stack):
    wait_for(lambda: primary_last_id(primary.client()) > 0, 20, "trades in the primary")
    result = btcfeed(stack, "primary", "resume")
    assert result.returncode == 1 and "not paused" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert writer_state(stack) == "primary"


def test_a_pause_survives_a_restart_of_writer_and_sync(primary, sim, stack):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 0, 20, "trades in the primary")
    first = verify.lowest_trade_id(client, SOURCE)
    assert btcfeed(stack, "primary", "pause").returncode == 0
    wait_for(lambda: local_client(stack).xlen(keys.BACKLOG) > 0, 10, "the backlog")
    for name in ("writer", "sync"):
        stack.kill(name)
    time.sleep(3)
    assert writer_state(stack) == "maintenance"
    frozen = primary_last_id(client)
    time.sleep(1)
    assert primary_last_id(client) == frozen
    assert btcfeed(stack, "primary", "resume").returncode == 0
    drain(client, sim)
    wait_verified(stack)
    assert verify_primary(client, sim, from_id=first).exact()
