"""A Sentinel-managed primary: three real sentinels, a master and a replica, all redis-server
processes on loopback. The stack follows the master through a real Sentinel failover exactly once,
says in /status which node is master, and writes the old master acknowledged but never replicated
are found and refilled by bin/sync-check --repair."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import redis

from btcfeed import keys

from tools import verify
from tools.redis_process import RedisProcess, free_port
from harness import (SOURCE, drain, primary_last_id, remove_stack, short_tmpdir, start_stack, verify_primary,
                     wait_for, wait_verified)

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RATE = 1000
SEED = 23
MASTER_NAME = "feedmaster"
DOWN_AFTER_MS = 1000
BURST_RATE = 20_000


class SentinelSet:
    """A master, one replica and three sentinels watching them (quorum 2)."""

    def __init__(self):
        self.root = short_tmpdir("bf-sentinel-")
        self.master = RedisProcess(os.path.join(self.root, "a"))
        self.replica = RedisProcess(os.path.join(self.root, "b"), extra_args=[
            "--replicaof", "127.0.0.1", str(self.master.port)])
        self.sentinels = []
        try:
            self.master.start()
            self.replica.start()
            wait_for(lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                     20, "the replica to sync")
            self.sentinels = [self._start_sentinel(i) for i in range(3)]
            self.ports = [port for port, _ in self.sentinels]
            wait_for(self._all_know_everyone, 30, "the sentinels to find each other and the replica")
        except BaseException:
            self.close()         # leave no server behind when the set-up fails
            raise

    def _start_sentinel(self, index: int):
        port = free_port()
        directory = os.path.join(self.root, f"s{index}")
        os.makedirs(directory)
        conf = os.path.join(directory, "sentinel.conf")
        with open(conf, "w") as handle:
            handle.write(f"port {port}\nbind 127.0.0.1\ndir {directory}\nlogfile {directory}/sentinel.log\n"
                         f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                         f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
                         f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                         f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        process = subprocess.Popen(["redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        return port, process

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[index], socket_timeout=2, decode_responses=True)

    def _all_know_everyone(self) -> bool:
        try:
            return all(self.sentinel(i).sentinel_master(MASTER_NAME)["num-other-sentinels"] == 2
                       and self.sentinel(i).sentinel_slaves(MASTER_NAME) for i in range(3))
        except (redis.RedisError, KeyError):
            return False

    def master_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def server_on(self, port: int) -> RedisProcess:
        return self.master if port == self.master.port else self.replica

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def close(self) -> None:
        for _, process in self.sentinels:
            process.terminate()
            process.wait(10)
        self.replica.stop()
        self.master.stop()


@pytest.fixture
def sentinel_set():
    servers = SentinelSet()
    yield servers
    servers.close()


def status(stack) -> dict:
    """GET /status, or an empty document while the health API is not listening yet."""
    try:
        url = f"http://{stack.env['BTCFEED_HEALTH_ADDR']}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.URLError:
        return {"redis": {"primary": {}}}


def writer_state(stack) -> str:
    local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
    value = local.hget(keys.WRITER_STATE, "state")
    return value.decode() if value else "primary"


def test_the_stack_follows_the_master_through_a_sentinel_failover(sentinel_set, sim):
    stack = start_stack(sentinel_set.master, sim, BTCFEED_PRIMARY_URL=sentinel_set.url)
    try:
        old = sentinel_set.master
        wait_for(lambda: primary_last_id(old.client()) > 0, 20, "trades in the master")
        wait_for(lambda: status(stack)["redis"]["primary"].get("master") == f"127.0.0.1:{old.port}", 10,
                 "/status to name the master")
        old.kill()
        killed = time.monotonic()
        wait_for(lambda: sentinel_set.master_port() == sentinel_set.replica.port, 30, "+switch-master")
        switched = time.monotonic()
        new = sentinel_set.replica
        before = primary_last_id(new.client())
        wait_for(lambda: writer_state(stack) == "primary" and primary_last_id(new.client()) > before, 30,
                 "the stack writing to the new master")
        followed = time.monotonic()
        print(f"sentinel switch {switched - killed:.2f}s after the kill; stack on the new master "
              f"{followed - switched:.2f}s after the switch")
        assert status(stack)["redis"]["primary"]["master"] == f"127.0.0.1:{new.port}"
        client = new.client()
        drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
    finally:
        remove_stack(stack)


def test_writes_lost_in_a_sentinel_failover_are_refilled_by_sync(sentinel_set, sim):
    """The replica is frozen while the master acknowledges writes, then the master dies: the
    promoted replica lacks them, and nothing errors. sync finds them (the promoted master's seen-set
    lacks what the local copy holds) and re-sends them; no cron, no operator."""
    stack = start_stack(sentinel_set.master, sim, BTCFEED_PRIMARY_URL=sentinel_set.url)
    old, replica = sentinel_set.master, sentinel_set.replica
    try:
        wait_for(lambda: primary_last_id(old.client()) > RATE, 20, "trades in the master")
        replica.freeze()
        # The master acknowledges a burst the frozen replica cannot take: more than the kernel's
        # socket buffers hold, so the rest waits in the master's memory and dies with it.
        sim.client.set_rate(BURST_RATE)
        time.sleep(2.0)
        sim.client.set_rate(RATE)
        stack.stop("ingest")                # the exchange side stops; the writer lands what it has
        wait_for(lambda: stack.info("ingest")["statename"] == "STOPPED", 10, "ingest to stop")
        local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
        wait_for(lambda: local.xlen(keys.BUS) == 0 or not local.xpending(keys.BUS, keys.BUS_GROUP)["pending"],
                 20, "the writer to land everything")
        acknowledged = primary_last_id(old.client())
        old.kill()
        killed = time.monotonic()
        replica.thaw()
        wait_for(lambda: sentinel_set.master_port() == replica.port, 30, "the replica's promotion")
        promoted = primary_last_id(replica.client())
        lost = acknowledged - promoted
        assert lost > 500, (acknowledged, promoted)     # the hazard is real: acknowledged writes are gone
        client = replica.client()
        wait_for(lambda: primary_last_id(client) == acknowledged, 30, "sync to refill the promoted master")
        refilled = time.monotonic()
        wait_verified(stack)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first, to_id=acknowledged)
        assert verdict.exact(), str(verdict)
        check = run_sync_check(stack, "--json")        # the on-demand check agrees
        assert check.returncode == 0, check.stdout
        print(f"{lost} acknowledged trades lost by the promotion; refilled by sync "
              f"{refilled - killed:.1f}s after the master died")
    finally:
        replica.thaw()
        remove_stack(stack)


def run_sync_check(stack, *args) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(ROOT, "bin", "sync-check"), *args], env=stack.env,
                          capture_output=True, text=True, timeout=120)


def test_a_dedicated_connection_follows_the_master_after_a_failover(sentinel_set, tmp_path):
    """The writer's and ingest's kept connection (storage/dedicated.py) on a Sentinel-managed primary:
    after the master dies and the replica is promoted, its next commands reach the new master, not
    the dead one's address."""
    from btcfeed import config as config_module
    from btcfeed.storage.dedicated import DedicatedConnection
    from btcfeed.storage.primary import connect_primary
    cfg = config_module.load({"BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_PRIMARY_URL": sentinel_set.url},
                             primary_override=False)
    own = DedicatedConnection(connect_primary(cfg, 500))
    assert own.call("INFO", "server")["tcp_port"] == sentinel_set.master.port
    old = sentinel_set.master
    old.kill()
    wait_for(lambda: sentinel_set.master_port() == sentinel_set.replica.port, 30, "+switch-master")

    def on_the_new_master():
        try:
            return own.call("INFO", "server")["tcp_port"] == sentinel_set.replica.port
        except redis.ConnectionError:
            return False       # a sentinel may still name the old master for a moment
    wait_for(on_the_new_master, 10, "the kept connection on the new master")
    assert own.call_many([("SET", "k", "v"), ("GET", "k")]) == [b"OK", b"v"]
