"""The connection the writer and ingest keep for their busiest commands (common/storage/dedicated.py),
against real redis-server processes: its replies and errors are the client's, it stays in step after
a refused command, it comes back after a server restart the way the client would, a frozen primary
costs one timeout (not two), and a blocked read on it can be ended by a stop (it carries the process's
connection name)."""

import threading
import time

import pytest
import redis

from btcfeed import config
from btcfeed.storage.bus import connect_local
from btcfeed.storage.dedicated import DedicatedConnection
from btcfeed.storage.primary import connect_primary
from tools.redis_process import RedisProcess


@pytest.fixture
def server(tmp_path):
    process = RedisProcess(str(tmp_path / "redis")).start()
    yield process
    process.stop()


def primary_client(server, tmp_path, timeout_ms=300):
    """A client built exactly as the writer builds its primary's."""
    cfg = config.load({"BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_PRIMARY_URL": server.url},
                      primary_override=False)
    return connect_primary(cfg, timeout_ms)


def test_replies_are_those_of_the_client(server):
    client = server.client()
    client.xgroup_create("bus", "g", id="0", mkstream=True)
    client.xadd("bus", {"t": b"\x00payload"})
    own = DedicatedConnection(client)
    delivered = own.call("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "bus", ">")
    assert delivered == client.xreadgroup("g", "c", {"bus": "0"}, count=10)     # the same parsed shape
    assert delivered[0][1][0][1] == {b"t": b"\x00payload"}
    assert own.call("PING") is True                                              # the client's callback
    assert own.call("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "BLOCK", 10, "STREAMS", "bus", ">") == []


def test_a_refused_command_leaves_the_connection_in_step(server):
    own = DedicatedConnection(server.client())
    replies = own.call_many([("SET", "k", "v"), ("INCR", "k"), ("GET", "k")])
    assert replies[0] == b"OK"
    assert isinstance(replies[1], redis.ResponseError) and "not an integer" in str(replies[1])
    assert replies[2] == b"v"
    with pytest.raises(redis.ResponseError):
        own.call("INCR", "k")
    assert own.call("GET", "k") == b"v"                          # the reply of this command, not a stale one


def test_a_script_the_server_lost_is_loaded_again(server):
    client = server.client()
    script = client.register_script("return ARGV[1] .. KEYS[1]")
    own = DedicatedConnection(client)
    assert own.run_script(script, ["k"], ["v"]) == b"vk"
    client.script_flush()
    assert own.run_script(script, ["k"], ["w"]) == b"wk"


def test_after_a_primary_restart_the_next_command_lands_as_with_the_client(server, tmp_path):
    """The primary's client sends a command again once when its pooled connection broke (a stale
    connection after a restart); the dedicated connection follows the same policy."""
    own = DedicatedConnection(primary_client(server, tmp_path))
    assert own.call("SET", "k", "1") is True
    server.kill()
    server.start()
    assert own.call("INCR", "k") == 2                     # the AOF kept k; sent once more, on a new socket
    server.kill()
    with pytest.raises(redis.ConnectionError):
        own.call("GET", "k")                              # down: the error reaches the writer (failover)
    server.start()
    assert own.call("GET", "k") == b"2"


def test_a_frozen_primary_costs_one_timeout_and_the_command_is_not_sent_twice(server, tmp_path):
    own = DedicatedConnection(primary_client(server, tmp_path, timeout_ms=300))
    own.call("SET", "n", 0)
    server.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            own.call_many([("INCR", "n")])
        assert time.monotonic() - started < 0.55            # one 300 ms timeout, not a second try
    finally:
        server.thaw()
    time.sleep(0.2)
    # The INCR's late reply is never read as another command's: the timed-out socket was dropped.
    assert own.call("ECHO", "after the thaw") == b"after the thaw"
    assert int(own.call("GET", "n")) <= 1                   # at most the one INCR sent (at the thaw)


def test_a_blocked_read_carries_the_process_name_so_a_stop_can_end_it(server):
    client = connect_local(server.url, name="btcfeed-writer")
    client.xgroup_create("bus", "g", id="0", mkstream=True)
    own = DedicatedConnection(client)
    result = {}

    def read():
        started = time.monotonic()
        result["reply"] = own.call("XREADGROUP", "GROUP", "g", "c", "BLOCK", 4000, "STREAMS", "bus", ">")
        result["took"] = time.monotonic() - started

    reader = threading.Thread(target=read)
    reader.start()
    observer = server.client(decode_responses=True)
    deadline = time.monotonic() + 2
    blocked = []
    while not blocked and time.monotonic() < deadline:
        blocked = [c for c in observer.client_list() if c["name"] == "btcfeed-writer" and "b" in c["flags"]]
        time.sleep(0.01)
    assert blocked, "the blocked read is not named as the process's own"
    observer.client_unblock(blocked[0]["id"])
    reader.join(2)
    assert result["reply"] == [] and result["took"] < 1.5
