"""The bus scripts that keep a source's cursor and gap records (common/storage/bus.py), against a real
redis-server: the invariant is that every id up to the cursor is on the bus or inside a gap
record, whatever mix of live batches, backfills, heartbeats and reconnects comes, and that every
script can be repeated after a lost reply."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btcfeed import keys
from btcfeed.storage.bus import ALREADY_DURABLE, BUS_FULL, PUBLISHED, PUBLISHED_AFTER_GAP, Bus
from btcfeed.trade import Trade, decode_batch

SOURCE = "binance:BTCUSDT"


def trades(first: int, last: int):
    return [Trade(i, "100.5", "0.1", "buy", 1_000 + i, 2_000 + i) for i in range(first, last + 1)]


@pytest.fixture
def bus(redis_server):
    client = redis_server.client()
    client.flushall()
    return Bus(client, max_entries=10_000, deadletter_max=100)


def bus_ids(bus) -> list:
    return [t.id for _, fields in bus.client.xrange(keys.BUS) for t in decode_batch(fields[b"t"])]


def gaps(bus) -> dict:
    return {field: (g.first, g.last, g.before) for field, g in bus.gaps(SOURCE).items()}


def test_contiguous_live_batches_move_the_cursor_without_gaps(bus):
    assert bus.publish(SOURCE, trades(1, 3)) == PUBLISHED
    assert bus.publish(SOURCE, trades(4, 6)) == PUBLISHED
    assert bus.cursor(SOURCE) == 6 and gaps(bus) == {} and bus_ids(bus) == [1, 2, 3, 4, 5, 6]
    assert bus.cursor_time(SOURCE) == 1_006


def test_a_jump_records_the_missing_ids_with_the_time_before_them(bus):
    bus.publish(SOURCE, trades(1, 3))
    assert bus.publish(SOURCE, trades(10, 12)) == PUBLISHED_AFTER_GAP
    assert gaps(bus) == {"4": (4, 9, 1_003)} and bus.cursor(SOURCE) == 12


def test_a_repeated_live_batch_is_a_no_op(bus):
    bus.publish(SOURCE, trades(1, 3))
    assert bus.publish(SOURCE, trades(1, 3)) == ALREADY_DURABLE
    assert bus_ids(bus) == [1, 2, 3]


def test_backfill_shrinks_the_gap_and_a_repeat_is_a_no_op(bus):
    bus.publish(SOURCE, trades(1, 3))
    bus.publish(SOURCE, trades(10, 12))
    assert bus.publish_backfill(SOURCE, "4", trades(4, 6)) == PUBLISHED
    assert gaps(bus) == {"7": (7, 9, 1_006)}
    assert bus.publish_backfill(SOURCE, "4", trades(4, 6)) == ALREADY_DURABLE      # the reply was lost
    assert bus.publish_backfill(SOURCE, "7", trades(7, 9)) == PUBLISHED
    assert gaps(bus) == {} and sorted(bus_ids(bus)) == list(range(1, 13))
    assert bus.cursor(SOURCE) == 12          # a backfill below the cursor never moves it


def test_a_backfill_must_start_where_its_gap_starts(bus):
    bus.publish(SOURCE, trades(1, 3))
    bus.publish(SOURCE, trades(10, 12))
    assert bus.publish_backfill(SOURCE, "4", trades(5, 6)) == ALREADY_DURABLE
    assert bus.publish_backfill(SOURCE, "5", trades(5, 6)) == ALREADY_DURABLE
    assert gaps(bus) == {"4": (4, 9, 1_003)}


def test_the_open_catch_up_follows_live_batches_until_a_jump_bounds_it(bus):
    bus.publish(SOURCE, trades(1, 3))
    assert bus.open_gap(SOURCE) and not bus.open_gap(SOURCE)        # once
    assert gaps(bus) == {"open": (4, None, None)}
    bus.publish(SOURCE, trades(4, 5))                               # the old connection's last trades
    assert gaps(bus) == {"open": (6, None, None)}
    assert bus.publish(SOURCE, trades(9, 10)) == PUBLISHED_AFTER_GAP   # the new connection starts at 9
    assert gaps(bus) == {"6": (6, 8, 1_005)}


def test_the_open_catch_up_over_rest_moves_the_cursor(bus):
    bus.publish(SOURCE, trades(1, 3))
    bus.open_gap(SOURCE)
    assert bus.publish_backfill(SOURCE, "open", trades(4, 7)) == PUBLISHED
    assert bus.cursor(SOURCE) == 7 and gaps(bus) == {"open": (8, None, None)}
    assert bus.publish(SOURCE, trades(6, 9)) == PUBLISHED           # overlapping live: nothing lost
    assert bus.cursor(SOURCE) == 9
    assert bus.give_up_gap(SOURCE, "open", "10")                    # caught up: closed
    assert gaps(bus) == {}


def test_a_heartbeat_ahead_of_the_cursor_records_a_gap(bus):
    bus.publish(SOURCE, trades(1, 3))
    assert bus.note_gap(SOURCE, 8) and not bus.note_gap(SOURCE, 8)
    assert gaps(bus) == {"4": (4, 8, 1_003)} and bus.cursor(SOURCE) == 8
    assert bus.publish(SOURCE, trades(9, 9)) == PUBLISHED


def test_giving_up_drops_a_gap_or_its_head(bus):
    bus.publish(SOURCE, trades(1, 3))
    bus.publish(SOURCE, trades(20, 20))
    record = bus.gaps(SOURCE)["4"].record
    assert not bus.give_up_gap(SOURCE, "4", "stale", 10)            # someone changed it: no-op
    assert bus.give_up_gap(SOURCE, "4", record, 10)
    assert gaps(bus) == {"10": (10, 19, None)}
    assert bus.give_up_gap(SOURCE, "10", bus.gaps(SOURCE)["10"].record)
    assert gaps(bus) == {}


def test_a_full_bus_refuses_both_kinds_of_batch(redis_server):
    client = redis_server.client()
    client.flushall()
    bus = Bus(client, max_entries=2, deadletter_max=10)
    bus.publish(SOURCE, trades(1, 1))
    bus.publish(SOURCE, trades(5, 5))
    assert bus.publish(SOURCE, trades(6, 6)) == BUS_FULL
    assert bus.publish_backfill(SOURCE, "2", trades(2, 4)) == BUS_FULL
    assert gaps(bus) == {"2": (2, 4, 1_001)} and bus.cursor(SOURCE) == 5


operations = st.lists(st.one_of(
    st.tuples(st.just("live"), st.integers(0, 6), st.integers(1, 5)),      # jump, length
    st.tuples(st.just("backfill"), st.integers(1, 6), st.booleans()),     # length, lose the reply
    st.tuples(st.just("heartbeat"), st.integers(0, 8)),
    st.tuples(st.just("reconnect"),),
), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_every_id_up_to_the_cursor_is_on_the_bus_or_in_a_gap(bus, ops):
    bus.client.flushall()
    exchange_last = 0              # the exchange's newest trade id so far
    bus.publish(SOURCE, trades(1, 1))
    for op in ops:
        if op[0] == "live":
            _, jump, length = op
            first = exchange_last + 1 + jump
            exchange_last = first + length - 1
            bus.publish(SOURCE, trades(first, exchange_last))
        elif op[0] == "backfill":
            _, length, lose_reply = op
            gap_list = sorted(bus.gaps(SOURCE).values(), key=lambda g: (g.field == "open", g.first))
            if gap_list:
                gap = gap_list[0]
                upto = gap.first + length - 1 if gap.last is None else min(gap.last, gap.first + length - 1)
                upto = min(upto, max(exchange_last, gap.first))
                bus.publish_backfill(SOURCE, gap.field, trades(gap.first, upto))
                if lose_reply:
                    bus.publish_backfill(SOURCE, gap.field, trades(gap.first, upto))
        elif op[0] == "heartbeat":
            exchange_last += op[1]
            bus.note_gap(SOURCE, exchange_last)
        else:
            bus.open_gap(SOURCE)
    cursor = bus.cursor(SOURCE)
    covered = set(bus_ids(bus))
    for gap in bus.gaps(SOURCE).values():
        if gap.last is not None:
            covered.update(range(gap.first, gap.last + 1))
    assert set(range(1, cursor + 1)) <= covered
    for gap in bus.gaps(SOURCE).values():     # gap records only hold ids at or below the cursor
        assert gap.last is None or gap.last <= cursor
