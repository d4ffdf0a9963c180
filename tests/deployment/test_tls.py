"""TLS and ACL to the primary, against a real redis-server serving TLS with certificates made by
the test: the right CA works (through a failover, exactly once), a wrong CA is refused with a clear
reason while trades are kept locally, a client certificate is presented when the server asks."""

import json
import os
import shutil
import subprocess

import pytest

from btcfeed import config as config_module

from tools import verify
from btcfeed import keys
from tools.redis_process import RedisProcess, free_port
from tools.tlscerts import make_test_pki, tls_server_args
from harness import (SOURCE, drain, primary_last_id, remove_stack, run_until, short_tmpdir, start_stack,
                     verify_primary, wait_for)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None,
                                 reason="openssl is needed to make certificates")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RATE = 1000
SEED = 13
ACL_PASSWORD = "acl-Tls-Password-0042"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_pki(str(tmp_path_factory.mktemp("certs")))


def tls_primary(certs: str, auth_clients: str = "optional") -> RedisProcess:
    """A primary with its plain port (for the test's own checks) and a TLS port (for the stack),
    and an ACL user btcfeed with a password."""
    tls_port = free_port()
    server = RedisProcess(short_tmpdir("bf-tls-"), extra_args=[
        *tls_server_args(certs, tls_port, auth_clients),
        "--user", "btcfeed", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"])
    server.tls_port = tls_port
    return server.start()


def tls_url(server) -> str:
    return f"rediss://btcfeed:{ACL_PASSWORD}@127.0.0.1:{server.tls_port}/0"


def writer_record(stack) -> dict:
    import redis
    local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
    return {k.decode(): v.decode() for k, v in local.hgetall(keys.WRITER_STATE).items()}


def test_tls_with_the_right_ca_and_an_acl_user_exactly_once_through_a_failover(certs, sim):
    primary = tls_primary(certs)
    stack = start_stack(primary, sim, BTCFEED_PRIMARY_URL=tls_url(primary),
                        BTCFEED_PRIMARY_TLS_CA_FILE=f"{certs}/ca.crt")
    try:
        client = primary.client()
        wait_for(lambda: primary_last_id(client) > 0, 20, "trades over TLS")
        assert writer_record(stack).get("state", "primary") == "primary"
        primary.kill()
        wait_for(lambda: writer_record(stack).get("state") == "failover", 10, "failover")
        primary.start()
        client = primary.client()
        wait_for(lambda: writer_record(stack).get("state") == "primary", 60, "hand-back over TLS")
        drain(client, sim)
        first = verify.lowest_trade_id(client, SOURCE)
        verdict = verify_primary(client, sim, from_id=first)
        assert verdict.exact(), str(verdict)
        clients = client.client_list()
        assert any(c.get("user") == "btcfeed" for c in clients)      # the stack logged in as the ACL user
    finally:
        remove_stack(stack)
        primary.stop()


def test_a_wrong_ca_is_refused_clearly_and_trades_are_kept_locally(certs, sim):
    primary = tls_primary(certs)
    stack = start_stack(primary, sim, BTCFEED_PRIMARY_URL=tls_url(primary),
                        BTCFEED_PRIMARY_TLS_CA_FILE=f"{certs}/other-ca.crt")
    try:
        def failover_record():
            record = writer_record(stack)
            return record if record.get("state") == "failover" else None

        record = wait_for(failover_record, 20, "the writer to refuse the primary")
        assert "BTCFEED_PRIMARY_TLS_CA_FILE" in record["reason"] and "certificate" in record["reason"]
        import redis
        local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock", socket_timeout=5)
        wait_for(lambda: local.xlen(keys.BACKLOG) > 3, 20, "the backlog to grow")
        assert primary_last_id(primary.client()) == -1          # nothing reached the primary
        results = run_until([os.path.join(ROOT, "bin", "health")],
                            lambda done: done.returncode == 1 and "certificate" in done.stdout, 30,
                            "bin/health to say degraded, naming the certificate", env=stack.env)
        assert all(ACL_PASSWORD not in result.stdout for result in results)
    finally:
        remove_stack(stack)
        primary.stop()


def test_a_client_certificate_is_presented_when_the_server_requires_one(certs, sim):
    primary = tls_primary(certs, auth_clients="yes")
    stack = start_stack(primary, sim, BTCFEED_PRIMARY_URL=tls_url(primary),
                        BTCFEED_PRIMARY_TLS_CA_FILE=f"{certs}/ca.crt",
                        BTCFEED_PRIMARY_TLS_CERT_FILE=f"{certs}/client.crt",
                        BTCFEED_PRIMARY_TLS_KEY_FILE=f"{certs}/client.key")
    try:
        wait_for(lambda: primary_last_id(primary.client()) > 0, 20, "trades over mutual TLS")
        assert writer_record(stack).get("state", "primary") == "primary"
    finally:
        remove_stack(stack)
        primary.stop()


def test_bin_health_reads_a_tls_primary_directly(certs):
    primary = tls_primary(certs)
    try:
        env = {**os.environ, "BTCFEED_STATE_DIR": short_tmpdir("bf-h-"),
               "BTCFEED_PRIMARY_URL": tls_url(primary), "BTCFEED_PRIMARY_TLS_CA_FILE": f"{certs}/ca.crt",
               "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}"}
        result = subprocess.run([os.path.join(ROOT, "bin", "health"), "--json"], env=env, capture_output=True,
                                text=True, timeout=60)
        document = json.loads(result.stdout)
        assert result.returncode == 3 and document["health"]["status"] == "unknown"   # no stack runs
        assert document["redis"]["primary"]["reachable"] and document["redis"]["primary"]["role"] == "master"
        assert document["redis"]["primary"]["url"].startswith("rediss://***@127.0.0.1")
    finally:
        primary.stop()


# --- configuration: verification cannot be turned off -------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"BTCFEED_PRIMARY_URL": "rediss://h:6380/0?ssl_cert_reqs=none"}, "cannot be turned off"),
    ({"BTCFEED_PRIMARY_URL": "rediss://h:6380/0?ssl_cert_reqs=optional"}, "cannot be turned off"),
    ({"BTCFEED_PRIMARY_URL": "redis://h:6379/0", "BTCFEED_PRIMARY_TLS_CA_FILE": __file__}, "not rediss://"),
    ({"BTCFEED_PRIMARY_URL": "rediss://h:6380/0", "BTCFEED_PRIMARY_TLS_CA_FILE": "/no/such/ca.crt"},
     "cannot read"),
    ({"BTCFEED_PRIMARY_URL": "rediss://h:6380/0", "BTCFEED_PRIMARY_TLS_CERT_FILE": __file__},
     "both or neither"),
    ({"BTCFEED_PRIMARY_URL": "redis://:a-pass@h:6379/0", "BTCFEED_PRIMARY_PASSWORD": "b-pass"}, "one place"),
    ({"BTCFEED_PRIMARY_PASSWORD_FILE": "/no/such/file"}, "cannot read"),
])
def test_tls_and_credential_settings_are_checked(env, message):
    with pytest.raises(config_module.ConfigError) as error:
        config_module.load(env)
    assert message in str(error.value)
    assert "a-pass" not in str(error.value) and "b-pass" not in str(error.value)


def test_password_from_a_file_is_used_and_kept_out_of_repr(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("file-Secret-77\n")
    cfg = config_module.load({"BTCFEED_PRIMARY_USERNAME": "btcfeed",
                              "BTCFEED_PRIMARY_PASSWORD_FILE": str(secret)})
    assert cfg.primary_password == "file-Secret-77" and "file-Secret-77" not in repr(cfg)
    from btcfeed.storage.primary import credentials
    assert credentials(cfg) == {"username": "btcfeed", "password": "file-Secret-77"}


def test_verification_is_on_by_default_for_rediss():
    from btcfeed.storage.primary import tls_options
    cfg = config_module.load({"BTCFEED_PRIMARY_URL": "rediss://h:6380/0"})
    assert tls_options(cfg) == {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
