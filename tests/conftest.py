"""Fixtures that start real redis-server processes (and, in test_pipeline, the real stack)."""

import pytest

from common.redis_process import RedisProcess


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
