"""The read view builder alone, against a real redis-server standing in for the local Redis: the
mirror, the failover copy, the bus with the writer's group and ingest's gap records are written here
exactly as the writer and ingest write them."""

import io
import time

import pytest

from btcfeed import keys
from btcfeed.events import recent_events
from btcfeed.lifecycle import EventLog
from btcfeed.processes.writer import ACK_SCRIPT, ack_script_input
from btcfeed.storage import view as view_module
from btcfeed.storage.apply import compressed_batch
from btcfeed.storage.view import (ViewBuilder, entry_trades, first_id_of, in_gap, trades_after, view_ends,
                                  wake_builder)
from btcfeed.trade import Trade, decode_batch, encode_batch

SOURCE = "binance:BTCUSDT"


def trade(trade_id: int) -> Trade:
    return Trade(trade_id, f"{60000 + trade_id % 97}.{trade_id % 100:02d}", "0.00100000",
                 "buy" if trade_id % 2 else "sell",
                 1_700_000_000_000 + trade_id, 1_700_000_000_050 + trade_id)


def mirror(client, ids) -> None:
    client.xadd(keys.mirror(SOURCE), compressed_batch(encode_batch([trade(i) for i in ids])))


def copy(client, ids) -> None:
    for i in ids:
        client.xadd(keys.trades(SOURCE), trade(i).fields())


def on_bus(client, ids) -> bytes:
    """A batch ingest put on the bus, not taken by the writer yet."""
    return client.xadd(keys.BUS, {"src": SOURCE, "n": len(ids), "t": encode_batch([trade(i) for i in ids])})


def writer_applies(client, where, count: int = 100) -> None:
    """The writer takes what is on the bus, writes it to the mirror or the failover copy, ACKs it."""
    reply = client.xreadgroup(keys.BUS_GROUP, "writer", {keys.BUS: ">"}, count=count)
    for entry_id, fields in (reply[0][1] if reply else []):
        where(client, [t.id for t in decode_batch(fields[b"t"])])
        client.xack(keys.BUS, keys.BUS_GROUP, entry_id)


def view_ids(client) -> list:
    out = []
    for entry_id, fields in client.xrange(keys.view(SOURCE)):
        trades = entry_trades(fields)
        assert first_id_of(entry_id) == trades[0].id
        assert [t.id for t in trades] == list(range(trades[0].id, trades[0].id + len(trades)))
        out.extend(t.id for t in trades)
    return out


def steps(builder, n: int = 5) -> None:
    for _ in range(n):
        builder.step(block_ms=10)


def wait_steps(builder, predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"builder state {builder.stats()}"
        builder.step(block_ms=20)


@pytest.fixture
def local(redis_server):
    client = redis_server.client()
    client.xgroup_create(keys.BUS, keys.BUS_GROUP, id="0", mkstream=True)
    yield client
    client.close()


@pytest.fixture
def log():
    return EventLog("api", stream=io.StringIO(), capture=False)


def test_out_of_order_arrival_and_duplicates_become_one_ordered_view(local, log):
    mirror(local, range(100, 110))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)
    assert view_ids(local) == list(range(100, 110))      # starts at the lowest id held
    on_bus(local, range(110, 115))                         # on its way through the writer
    mirror(local, range(115, 120))                         # arrives before 110-114
    copy(local, [105, 106, 107])                           # already in the view: dropped
    steps(builder, 2)
    time.sleep(view_module.STUCK_CHECK_EVERY_S)
    steps(builder, 2)
    assert view_ids(local) == list(range(100, 110))
    assert builder.stats()["held_back"] == 5
    writer_applies(local, copy)
    mirror(local, range(112, 118))                         # the same trades again, in the other stream
    steps(builder, 3)
    assert view_ids(local) == list(range(100, 120))
    assert builder.stats()["held_back"] == 0
    assert int(local.hget(keys.view_state(SOURCE), "next")) == 120
    # Read back by trade id.
    assert [t.id for t in trades_after(local, SOURCE, 104, 7)] == list(range(105, 112))
    assert [t.id for t in trades_after(local, SOURCE, 119, 10)] == []
    assert trades_after(local, SOURCE, 110, 3)[0] == trade(111)
    first, last = view_ends(local, SOURCE)
    assert (first.id, last.id) == (100, 119)


def test_a_gap_record_holds_the_view_back_until_the_backfill_fills_it(local, log):
    mirror(local, range(1, 11))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)
    local.hset(keys.gaps(SOURCE), "11", "20:1700000000010")
    mirror(local, range(21, 31))
    steps(builder, 3)
    time.sleep(view_module.STUCK_CHECK_EVERY_S)
    steps(builder, 3)                                      # the bus is empty: only the gap record holds it
    assert view_ids(local) == list(range(1, 11))
    assert builder.stats()["waiting_on_gap"] and builder.stats()["skipped"] == 0
    # The backfill delivers the first part; the record shrinks to what is still missing.
    pipe = local.pipeline(transaction=True)
    pipe.hdel(keys.gaps(SOURCE), "11")
    pipe.hset(keys.gaps(SOURCE), "16", "20:")
    pipe.execute()
    mirror(local, range(11, 16))
    wait_steps(builder, lambda: view_ids(local)[-1] == 15)
    time.sleep(view_module.STUCK_CHECK_EVERY_S)
    steps(builder, 3)
    assert view_ids(local) == list(range(1, 16))
    local.hdel(keys.gaps(SOURCE), "16")
    copy(local, range(16, 21))
    wait_steps(builder, lambda: view_ids(local)[-1] == 30)
    assert view_ids(local) == list(range(1, 31))
    assert not [e for e in recent_events(local, 50) if e["event"] == "view_ids_skipped"]


def test_an_open_catch_up_counts_as_a_gap():
    assert in_gap(50, {"open": "40"}) and not in_gap(39, {"open": "40"})
    assert in_gap(12, {"10": "15:123"}) and not in_gap(16, {"10": "15:123"})


def test_a_given_up_id_is_skipped_only_after_the_writer_has_passed_the_bus(local, log):
    mirror(local, range(1, 11))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)
    mirror(local, range(14, 20))                           # 11-13 are missing, in no gap record
    # A bus entry the writer has not taken yet (it could hold the missing ids).
    bus_id = local.xadd(keys.BUS, {"src": SOURCE, "n": 2, "t": encode_batch([trade(20), trade(21)])})
    for _ in range(6):
        steps(builder, 2)
        time.sleep(view_module.STUCK_CHECK_EVERY_S)
    assert view_ids(local) == list(range(1, 11)) and builder.stats()["skipped"] == 0
    # Delivered but not ACKed: still not passed.
    local.xreadgroup(keys.BUS_GROUP, "writer", {keys.BUS: ">"}, count=10)
    for _ in range(3):
        steps(builder, 2)
        time.sleep(view_module.STUCK_CHECK_EVERY_S)
    assert view_ids(local) == list(range(1, 11))
    # The writer mirrors the batch and ACKs it: now 11-13 are known to be given up.
    mirror(local, [20, 21])
    local.xack(keys.BUS, keys.BUS_GROUP, bus_id)
    wait_steps(builder, lambda: view_ids(local)[-1:] == [21])
    assert view_ids(local) == list(range(1, 11)) + list(range(14, 22))
    skipped = [e for e in recent_events(local, 50) if e["event"] == "view_ids_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["fields"] == {"source": SOURCE, "first": 11, "last": 13, "count": 3}
    assert builder.stats()["skipped"] == 3


def test_the_missing_id_found_when_reading_to_the_ends_is_not_skipped(local, log):
    """The writer passed the bus entry, and the missing trades were written meanwhile: no skip."""
    mirror(local, range(1, 6))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)
    on_bus(local, [6, 7])
    mirror(local, range(8, 10))
    passed = builder._writer_passed

    def writer_applies_meanwhile(target):
        # The writer applies the batch between the builder's last read and its look at the group.
        writer_applies(local, copy)
        return passed(target)

    builder._writer_passed = writer_applies_meanwhile
    time.sleep(view_module.STUCK_CHECK_EVERY_S)
    steps(builder, 3)
    assert view_ids(local) == list(range(1, 10)) and builder.stats()["skipped"] == 0


def test_a_builder_killed_at_any_point_loses_and_duplicates_nothing(local, log):
    """Builders are dropped without any shutdown (as a SIGKILL leaves them) after each step, while
    trades arrive out of order in both streams; each new builder goes on from view_state alone."""
    import random
    rng = random.Random(5)
    ids = list(range(1000, 3000))
    chunks, start = [], 0
    while start < len(ids):
        size = rng.randint(1, 60)
        chunks.append(ids[start:start + size])
        start += size
    later = chunks[1:]
    rng.shuffle(later)                                     # live batches ahead of backfilled ones
    mirror(local, chunks[0])                               # where the view starts
    for chunk in later:
        on_bus(local, chunk)
    builder = ViewBuilder(local, SOURCE, log)
    builder.step(block_ms=10)
    for number in range(len(later)):
        writer_applies(local, mirror if number % 3 else copy, count=1)
        if number % 4 == 0:
            copy(local, rng.sample(ids, 5))                # re-sent trades, old and new
        builder.step(block_ms=0)
        if number % 2 == 0:
            builder = ViewBuilder(local, SOURCE, log)      # the old one is gone with its buffer
    wait_steps(builder, lambda: builder.next == 3000)
    assert view_ids(local) == ids


def test_a_full_buffer_sheds_and_reads_again(local, log, monkeypatch):
    monkeypatch.setattr(view_module, "MAX_BUFFERED", 20)
    mirror(local, [1])
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 1)
    on_bus(local, [2])
    mirror(local, range(3, 60))                            # 2 is late
    steps(builder, 2)
    assert len(builder.buffer) <= 20 and builder.next == 2
    writer_applies(local, copy)
    wait_steps(builder, lambda: builder.next == 60)
    assert view_ids(local) == list(range(1, 60)) and builder.counts["rereads"] >= 1


def test_the_view_is_trimmed_to_what_the_local_copy_still_holds(local, log, monkeypatch):
    monkeypatch.setattr(view_module, "TRIM_EVERY_S", 0.0)
    monkeypatch.setattr(view_module, "RUN_MAX", 10)
    mirror(local, range(1, 51))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)
    assert view_ids(local) == list(range(1, 51))
    mirror(local, range(51, 61))
    # the local copy dropped its oldest batch
    local.xtrim(keys.mirror(SOURCE), maxlen=1, approximate=False)
    steps(builder, 2)
    assert view_ids(local)[0] == 51 and view_ids(local)[-1] == 60


# --- the writer's own appends (ACK_SCRIPT with APPEND_TO_VIEW_LUA) ---------------------------------
def writer_mirrors(client, ids) -> None:
    """A batch put on the bus and taken at once by the writer (the primary confirmed it)."""
    on_bus(client, ids)
    writer_takes(client, None)


def writer_takes(client, failover_copy) -> None:
    """The writer takes the bus's next batch: with the primary, its real mirror-and-ACK script
    (mirror, view when it can, ACK); in failover (failover_copy), the copy and the ACK."""
    reply = client.xreadgroup(keys.BUS_GROUP, "writer", {keys.BUS: ">"}, count=1)
    entry_id, fields = reply[0][1][0]
    if failover_copy:
        failover_copy(client, [t.id for t in decode_batch(fields[b"t"])])
        client.xack(keys.BUS, keys.BUS_GROUP, entry_id)
        return
    batch = [(SOURCE, fields[b"t"])]
    client.register_script(ACK_SCRIPT)(*ack_script_input([entry_id], batch, None, 3_600_000))


def writer_copies(client, ids) -> None:
    """The writer in failover: the failover copy, with the builder's wake token."""
    pipe = client.pipeline(transaction=True)
    for i in ids:
        pipe.xadd(keys.trades(SOURCE), trade(i).fields())
    wake_builder(pipe, SOURCE)
    pipe.execute()


def test_at_a_real_rate_the_writer_builds_the_view_and_the_builder_is_never_woken(local, log):
    writer_mirrors(local, range(1, 4))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 2)                                      # the builder starts the view
    assert view_ids(local) == [1, 2, 3] and local.llen(keys.view_wake(SOURCE)) == 0
    for first in range(4, 200, 3):                         # batches of 3 consecutive ids
        writer_mirrors(local, range(first, first + 3))
    assert view_ids(local) == list(range(1, 202))          # no builder step since
    assert local.llen(keys.view_wake(SOURCE)) == 0
    assert local.hget(keys.view_state(SOURCE), "m") == local.hget(keys.MIRROR_CONFIRMED, SOURCE)
    steps(builder, 2)                                      # a builder woken by its timeout: nothing to do
    assert view_ids(local) == list(range(1, 202)) and builder.counts["appended"] == 3


@pytest.mark.parametrize("batch", [[10, 12, 11], [9, 10], [12, 13], list(range(10, 20))])
def test_a_batch_the_writer_cannot_append_wakes_the_builder_which_does(local, log, monkeypatch, batch):
    """Out of order, below next, above next, longer than a bus batch: never appended by the writer."""
    monkeypatch.setattr(view_module, "BUS_BATCH_MAX", 5)
    writer_mirrors(local, range(1, 10))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 1)
    assert view_ids(local) == list(range(1, 10))
    writer_mirrors(local, batch)
    assert view_ids(local) == list(range(1, 10))
    assert local.llen(keys.view_wake(SOURCE)) == 1
    writer_mirrors(local, [b for b in range(10, 20) if b not in batch])
    assert builder.step(block_ms=5000) > 0                 # woken at once by the token
    steps(builder, 2)
    assert view_ids(local) == list(range(1, 20))
    local.delete(keys.view_wake(SOURCE))
    for first in range(20, 40, 4):                         # the writer appends again after
        writer_mirrors(local, range(first, first + 4))
    assert view_ids(local) == list(range(1, 40)) and local.llen(keys.view_wake(SOURCE)) == 0


def test_the_writer_appending_between_the_builders_read_and_its_append_duplicates_nothing(local, log):
    writer_mirrors(local, range(1, 5))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 1)
    writer_copies(local, range(5, 10))                     # failover: the builder's to append
    real_append = builder._append_runs

    def writer_appends_first():
        writer_mirrors(local, range(5, 8))                 # handed back: the writer's own append
        return real_append()

    builder._append_runs = writer_appends_first
    builder.step(block_ms=0)
    builder._append_runs = real_append
    steps(builder, 2)
    assert view_ids(local) == list(range(1, 10))


def test_writer_and_builder_killed_at_any_point_lose_and_duplicate_nothing(local, log, monkeypatch):
    """Batches of every kind (in order, out of order, long, re-sent) on the bus, taken one at a time by
    the real mirror-and-ACK script or written to the failover copy, builder steps in between and
    builders dropped as a SIGKILL leaves them."""
    import random
    monkeypatch.setattr(view_module, "RUN_MAX", 40)
    rng = random.Random(11)
    ids = list(range(5000, 9000))
    chunks, start = [], 0
    while start < len(ids):
        size = rng.choice([1, 2, 3, 5, 60])
        chunks.append(ids[start:start + size])
        start += size
    for number in range(1, len(chunks) - 1, 9):            # some pairs arrive swapped
        chunks[number], chunks[number + 1] = chunks[number + 1], chunks[number]
    writer_mirrors(local, chunks[0])                       # where the view starts
    for number, chunk in enumerate(chunks[1:], 1):
        on_bus(local, chunk if number % 11 else list(reversed(chunk)))
    builder = ViewBuilder(local, SOURCE, log)
    for number in range(1, len(chunks)):
        if number % 7 == 3:
            writer_takes(local, writer_copies)
        else:
            writer_takes(local, None)
        if number % 13 == 0:
            writer_copies(local, rng.sample(ids, 3))       # re-sent trades, old and new
        if rng.random() < 0.4:
            builder.step(block_ms=0)
        if rng.random() < 0.1:
            builder = ViewBuilder(local, SOURCE, log)
    wait_steps(builder, lambda: builder.next == 9000)
    assert view_ids(local) == ids


def test_a_lost_reply_runs_the_writers_script_twice_and_the_view_holds_each_trade_once(local, log):
    """The writer's mirror-and-ACK script ran, but its reply was lost: the writer sends it again for
    the same bus entry (the entry is still pending to the writer)."""
    writer_mirrors(local, range(1, 4))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 1)
    entry_id = on_bus(local, range(4, 8))
    local.xreadgroup(keys.BUS_GROUP, "writer", {keys.BUS: ">"}, count=1)
    script = local.register_script(ACK_SCRIPT)
    script_input = ack_script_input([entry_id], [(SOURCE, encode_batch([trade(i) for i in range(4, 8)]))],
                                    None, 3_600_000)
    script(*script_input)
    script(*script_input)                                  # the same call again
    assert local.llen(keys.view_wake(SOURCE)) == 1         # the repeat was not appended: the builder's
    steps(builder, 2)                                      # reads it, drops it, and says how far it read
    for first in range(8, 20, 4):
        writer_mirrors(local, range(first, first + 4))     # so the writer appends again at once
    assert view_ids(local) == list(range(1, 20)) and local.llen(keys.view_wake(SOURCE)) == 0
    assert local.xlen(keys.mirror(SOURCE)) == 6            # the repeat is a second mirror entry, harmless


def test_a_forgotten_view_state_stops_the_writers_appends_and_the_view_is_built_again(local, log):
    """view_state is gone without an error (a key lost with the server's last second, an operator's
    DEL): the writer cannot know where the view ends, so it appends nothing, and the builder builds the
    view again from the local copy."""
    writer_mirrors(local, range(1, 4))
    builder = ViewBuilder(local, SOURCE, log)
    steps(builder, 1)
    writer_mirrors(local, range(4, 8))
    local.delete(keys.view_state(SOURCE))
    writer_mirrors(local, range(8, 12))
    assert view_ids(local) == list(range(1, 8))            # not appended after the state was lost
    assert local.llen(keys.view_wake(SOURCE)) == 1
    wait_steps(builder, lambda: builder.next == 12)
    assert view_ids(local) == list(range(1, 12))
    writer_mirrors(local, range(12, 16))                   # and the writer appends again after
    assert view_ids(local) == list(range(1, 16))
