"""The one way every process connects to the primary: URL, credentials and TLS from the
configuration, short timeouts, and the retry policy that keeps replays safe."""

import time
from typing import Optional
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from btcfeed import keys
from btcfeed.config import CLUSTER_SCHEME, SENTINEL_SCHEME, parse_cluster_url, parse_sentinel_url


def connect_primary(config, timeout_ms: int) -> redis.Redis:
    """Short timeouts so a dead or black-holed primary is noticed in well under a second.

    redis-py re-sends a command once when the connection broke (a stale pooled connection after a
    primary restart); that is safe because the callers only send the idempotent apply script,
    reads and the probe. A timeout is not retried: a frozen primary would cost a second timeout.
    """
    timeout_s = timeout_ms / 1000
    options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=0,
                   retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)))
    options.update(credentials(config))
    scheme = urlsplit(config.primary_url).scheme
    if scheme == SENTINEL_SCHEME:
        return _sentinel_master(config, options)
    if scheme == CLUSTER_SCHEME:
        return _cluster(config, options)
    options.update(tls_options(config))
    return redis.Redis.from_url(config.primary_url, **options)


def _sentinel_master(config, options: dict) -> redis.Redis:
    """A client that asks the sentinels for the master on every new connection, and drops its
    connection when the node it talks to was demoted (READONLY): after a Sentinel failover the
    writer's next error makes it fail over locally, and sync's probe finds the new master."""
    parsed = parse_sentinel_url(config.primary_url)
    timeouts = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout")}
    master_options = {"username": parsed["username"] or None, "password": parsed["password"] or None,
                      **options, "db": parsed["db"]}
    sentinel = Sentinel(parsed["sentinels"], sentinel_kwargs=timeouts)
    return sentinel.master_for(parsed["service"], **master_options)


def is_cluster(config) -> bool:
    return urlsplit(config.primary_url).scheme == CLUSTER_SCHEME


def _cluster(config, options: dict) -> RedisCluster:
    """A cluster client: commands go to the master of their key's slot (every key of a source
    shares one hash tag, so one apply script touches one slot). It does not cover for a slot
    whose master is down: the writer fails over locally, sync waits for the cluster to promote a
    replica, and the replay goes to the new master."""
    parsed = parse_cluster_url(config.primary_url)
    options = {**options, "retry": Retry(NoBackoff(), 1)}
    options.pop("health_check_interval")
    if parsed["username"] and "username" not in options:
        options["username"] = parsed["username"]
    if parsed["password"] and "password" not in options:
        options["password"] = parsed["password"]
    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in parsed["nodes"]],
                        require_full_coverage=False, **options)


def cluster_probe(client: RedisCluster, sources) -> dict:
    """The cluster's health for the feed: the state is ok and the master of every source's slot
    takes a write. The identity is the set of masters' run ids, so a slot failover or a restart
    reads as a new primary (and the last writes before it are re-sent, see sync's re-seed)."""
    state = client.cluster_info().get("cluster_state")
    if state != "ok":
        raise redis.exceptions.ClusterDownError(f"cluster_state is {state}")
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for source in sources:
        pipe.set(keys.source_probe(source), now_ms, px=10_000)
    pipe.execute()
    servers = client.info("server", target_nodes=RedisCluster.PRIMARIES)
    run_ids = sorted(info.get("run_id", "") for info in servers.values()) if isinstance(servers, dict) else []
    return {"run_id": ",".join(run_ids) or None}


class NotWritable(redis.RedisError):
    """The server answers but is no master that takes btcfeed's writes (a replica)."""


def probe(client, cluster: bool, sources) -> dict:
    """One health check of a primary: it answers, is a master and takes a write; its identity
    ({"run_id"}). A Redis error says why not; NotWritable for a replica."""
    if cluster:
        return cluster_probe(client, sources)
    pipe = client.pipeline(transaction=False)
    pipe.info("server")
    pipe.info("replication")
    pipe.set(keys.PROBE, int(time.time() * 1000), px=10_000)
    server, replication, _ = pipe.execute()
    if replication.get("role") != "master":
        raise NotWritable(f"primary is a replica (role {replication.get('role')}), not writable")
    return {"run_id": server.get("run_id")}


def master_address(config, timeout_ms: int):
    """(host, port) of the master the sentinels name now, or None for a plain primary URL."""
    if urlsplit(config.primary_url).scheme != SENTINEL_SCHEME:
        return None
    parsed = parse_sentinel_url(config.primary_url)
    timeout_s = timeout_ms / 1000
    sentinel = Sentinel(parsed["sentinels"], sentinel_kwargs={"socket_timeout": timeout_s,
                                                              "socket_connect_timeout": timeout_s})
    try:
        return sentinel.discover_master(parsed["service"])
    finally:
        for client in sentinel.sentinels:
            client.close()


def credentials(config) -> dict:
    """User name and password given outside the URL (the URL's own, if any, are used as they are)."""
    out = {}
    if config.primary_username:
        out["username"] = config.primary_username
    if config.primary_password:
        out["password"] = config.primary_password
    return out


def tls_options(config) -> dict:
    """For rediss://: the certificate is always verified, against the CA file given or the system's
    CAs, and its host name checked; a client certificate when given."""
    if urlsplit(config.primary_url).scheme != "rediss":
        return {}
    out = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if config.primary_tls_ca_file:
        out["ssl_ca_certs"] = config.primary_tls_ca_file
    if config.primary_tls_cert_file:
        out["ssl_certfile"] = config.primary_tls_cert_file
        out["ssl_keyfile"] = config.primary_tls_key_file
    return out


# --- eviction: the one maxmemory-policy that never drops btcfeed's keys ----------------------------
SAFE_EVICTION_POLICY = "noeviction"


def maxmemory_policies(client) -> dict:
    """maxmemory-policy of every node that takes btcfeed's writes, from INFO memory: the one server
    (or the master the sentinels name now) as "primary", or each master of a cluster by host:port.
    None where the server does not say."""
    if isinstance(client, RedisCluster):
        # One INFO per master: a cluster answers a single node's INFO unwrapped, several nodes' by name.
        return {node.name: client.info("memory", target_nodes=node).get("maxmemory_policy")
                for node in client.get_primaries()}
    return {"primary": client.info("memory").get("maxmemory_policy")}


def eviction_reason(policies: dict) -> Optional[str]:
    """One line when any node could evict btcfeed's keys, else None (an unknown policy is not
    reported: some managed services do not show it)."""
    unsafe = {name: policy for name, policy in policies.items() if policy and policy != SAFE_EVICTION_POLICY}
    if not unsafe:
        return None
    if list(unsafe) == ["primary"]:
        which = unsafe["primary"]
    else:
        which = ", ".join(f"{policy} on {name}" for name, policy in sorted(unsafe.items()))
    return (f"primary maxmemory-policy is {which}, not noeviction: under memory pressure Redis may evict "
            "btcfeed's seen-set (replays would write duplicates) and trade streams (trades lost)")


def eviction_risk(client) -> Optional[str]:
    """Why the primary could lose or duplicate trades by evicting keys, or None when it cannot.
    Raises the client's RedisError when the primary does not answer."""
    return eviction_reason(maxmemory_policies(client))
