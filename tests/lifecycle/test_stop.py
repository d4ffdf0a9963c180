"""A stop is prompt even when a process is idle: its blocking reads of the local Redis wait up to a
second (so an idle stack wakes rarely), and a stop unblocks them at once. Measured on the real stack
with the exchange quiet, each program stopped on its own by supervisord."""

import time

import pytest

from harness import remove_stack, start_stack, wait_for, primary_last_id

pytestmark = pytest.mark.integration
RATE = 500


@pytest.fixture
def stack(primary, sim):
    running = start_stack(primary, sim)
    yield running
    remove_stack(running)


def test_an_idle_program_stops_well_within_its_read_block(primary, sim, stack):
    client = primary.client()
    wait_for(lambda: primary_last_id(client) > 0, 20, "trades in the primary")
    sim.client.pause()
    took = {}
    for program in ("writer", "sync", "ingest", "api"):
        time.sleep(1.5)                    # idle: every blocking read is waiting for its full second
        started = time.monotonic()
        stack.stop(program)
        took[program] = time.monotonic() - started
        stack.start(program)
    slow = {program: round(seconds, 2) for program, seconds in took.items() if seconds >= 0.6}
    assert not slow, f"took this long to stop while idle (s): {slow}"
