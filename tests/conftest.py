"""Fixtures that start real redis-server processes (and, in test_pipeline, the real stack)."""

import shutil

import pytest

from tools.redis_process import RedisProcess
from harness import Simulator, short_tmpdir


@pytest.fixture
def redis_server(tmp_path):
    server = RedisProcess(str(tmp_path / "redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def primary():
    """A stand-in primary on a free port, AOF on like a managed one."""
    server = RedisProcess(short_tmpdir("bf-primary-")).start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def primary_client(primary):
    client = primary.client()
    yield client
    client.close()


@pytest.fixture
def sim(request):
    """The exchange simulator at the test module's RATE (and SEED)."""
    simulator = Simulator(rate=getattr(request.module, "RATE", 2000), seed=getattr(request.module, "SEED", 7))
    yield simulator
    simulator.stop()
