"""The command packer sends byte for byte what redis-py's own packer sends, and refuses what it refuses."""

import pytest
import redis
from redis.connection import Connection

from btcfeed.storage.wire import command_packer

ARGUMENTS = [
    ("PING",),
    ("CLIENT SETNAME", "btcfeed-writer"),
    (b"CLIENT UNBLOCK", 12, b"ERROR"),
    ("EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", 3, "a", b"b", "c", 0, -1, 2 ** 62, 10 ** 30),
    ("HSET", "k", "price", "67000.01", "note", "déjà vu €", "raw", b"\x00\xff\r\n"),
    ("BLPOP", "wake", 0.01),
    ("SET", "k", 1.5, "PX", 100),
    ("XADD", "s", "MINID", "~", 1733412345678, "*", "z", memoryview(b"payload")),
]


@pytest.mark.parametrize("args", ARGUMENTS, ids=[str(a[0]) for a in ARGUMENTS])
def test_the_bytes_on_the_wire_are_redis_pys_own(args):
    own = Connection()._command_packer.pack(*args)
    ours = command_packer().pack(*args)
    assert b"".join(ours) == b"".join(bytes(part) for part in own)


@pytest.mark.parametrize("bad", [True, None, {"a": 1}])
def test_what_redis_py_refuses_is_refused(bad):
    with pytest.raises(redis.DataError):
        Connection()._command_packer.pack("SET", "k", bad)
    with pytest.raises(redis.DataError):
        command_packer().pack("SET", "k", bad)


def test_a_client_made_by_the_stack_uses_it(redis_server):
    from btcfeed.storage.bus import connect_local
    client = connect_local(redis_server.url)
    client.hset("k", mapping={"a": 1, "b": 2.5, "c": "é"})
    assert client.hgetall("k") == {b"a": b"1", b"b": b"2.5", b"c": "é".encode()}
    assert type(client.connection_pool.get_connection()._command_packer).__name__ == "CommandPacker"
