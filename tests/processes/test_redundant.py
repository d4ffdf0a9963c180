"""Two complete stacks (separate state dirs, as on two hosts) feed one primary from one exchange:
every trade still lands exactly once, and killing one stack entirely leaves no gap."""

import pytest

from btcfeed import keys

from tools import verify
from harness import (SOURCE, drain, kill_host, primary_last_id, remove_stack, start_stack, verify_derived,
                     verify_primary, wait_for)

pytestmark = pytest.mark.integration
RATE = 1000
SEED = 17


def writer_counts(stack) -> dict:
    import json
    import redis
    local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
    beat = local.get(keys.heartbeat("writer"))
    return json.loads(beat) if beat else {}


def test_two_stacks_one_primary_exactly_once_and_no_gap_when_one_dies(primary, sim):
    first_stack = start_stack(primary, sim)
    second_stack = start_stack(primary, sim)
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > 0, 20, "trades in the primary")
        # Both stacks write every trade; the primary's seen-set keeps the first and skips the second.
        wait_for(lambda: writer_counts(first_stack).get("skipped", 0) > 0
                 or writer_counts(second_stack).get("skipped", 0) > 0, 20, "a trade offered twice")
        before = primary_last_id(client)
        kill_host(first_stack)
        wait_for(lambda: primary_last_id(client) > before + 2 * RATE, 20, "trades after the loss of a stack")
        last_id = drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last_id)
        counts = writer_counts(second_stack)
        assert counts["applied"] > 0 and counts["skipped"] > 0
    finally:
        remove_stack(second_stack)
        remove_stack(first_stack)
