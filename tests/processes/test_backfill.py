"""Backfill at scale and connection replacement through the real stack: after a long ingest
outage the live trades land at once while the gap is filled over REST behind them (slowed here by
REST 429 answers), and ingest SIGKILLed in the middle of that backfill goes on where it stopped;
a server shutdown notice is met with an overlapping new connection. Every id exactly once."""

import time

import pytest
import redis

from btcfeed import keys

from tools import verify
from harness import (SOURCE, drain, primary_last_id, remove_stack, start_stack, verify_derived,
                     verify_primary, wait_for)

pytestmark = pytest.mark.integration
RATE = 1000
SEED = 31
OUTAGE_S = 8.0


def local(stack) -> redis.Redis:
    return redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)


def missing_ids(stack) -> int:
    total = 0
    for field, value in local(stack).hgetall(keys.gaps(SOURCE)).items():
        if field != b"open":
            total += int(value.split(b":")[0]) - int(field) + 1
    return total


def test_live_trades_flow_during_a_long_backfill_that_survives_sigkill(primary, sim):
    stack = start_stack(primary, sim)
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > 0, 20, "trades in the primary")
        stack.stop("ingest")
        time.sleep(OUTAGE_S)                        # the exchange prints ~8,000 trades meanwhile
        sim.client.fault("rest429", count=6)        # and its REST answers 429 to the first calls
        restart_id = sim.client.status()["last_id"]
        stack.start("ingest")
        # Live trades printed after the restart reach the primary while the gap is still open.
        wait_for(lambda: primary_last_id(client) > restart_id, 10, "live trades during the backfill")
        assert missing_ids(stack) > RATE, "the backfill was expected to be still running"
        stack.kill("ingest")                        # in the middle of the backfill
        wait_for(lambda: stack.info("ingest")["statename"] == "RUNNING", 30, "ingest restarted")
        wait_for(lambda: missing_ids(stack) == 0, 90, "the backfill to finish after the restart")
        last = drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last)
    finally:
        remove_stack(stack)


def test_server_shutdown_notice_opens_the_next_connection_before_the_close(primary, sim):
    """Binance's serverShutdown: the next connection opens at once and takes over; the old one
    closes two seconds later with nothing lost."""
    stack = start_stack(primary, sim)
    client = primary.client()
    try:
        wait_for(lambda: primary_last_id(client) > RATE, 20, "trades in the primary")
        sim.client.fault("shutdown", seconds=2)
        def second_connection():
            text = open(stack.log_path("ingest")).read()
            return text if "event=connected source=binance:BTCUSDT connection=2" in text else None

        log = wait_for(second_connection, 5, "the next connection")
        # Opened on the notice, not after the close: the old connection was let go by ingest once
        # the new one delivered, before the exchange closed it.
        assert log.index("event=server_shutdown_notice") < log.index("connection=2")
        assert "event=connection_lost" not in log
        time.sleep(3)                               # past the exchange's close
        assert sim.client.status()["connections"] == 1
        last = drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        verify_derived(client, sim, first, last)
        assert "event=gap " not in open(stack.log_path("ingest")).read()   # the overlap left no gap
    finally:
        remove_stack(stack)


class FakeSocket:
    def __init__(self):
        self.pongs = []

    def pong(self, payload):
        self.pongs.append(payload)


def test_never_more_than_five_messages_a_second_to_the_exchange(redis_server):
    import threading
    from btcfeed.storage.bus import Bus
    from btcfeed.config import Source, load
    from btcfeed.processes.ingest import Connection, SourceFeed

    class SilentLog:
        def __getattr__(self, name):
            return lambda *args, **fields: None

    feed = SourceFeed(Source("binance", "BTCUSDT"), load({}), Bus(redis_server.client(), 100, 10),
                      SilentLog(), threading.Event())
    conn = Connection(feed, 1)
    conn.ws = FakeSocket()
    for index in range(12):                         # a burst of pings
        conn._pong(b"%d" % index)
    assert len(conn.ws.pongs) == 5
    time.sleep(1.05)
    conn._pong(b"later")
    assert conn.ws.pongs[-1] == b"later"
