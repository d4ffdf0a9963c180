"""The one way every process connects to the primary: URL, credentials and TLS from the
configuration, short timeouts, and the retry policy that keeps replays safe."""

from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


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
    options.update(tls_options(config))
    return redis.Redis.from_url(config.primary_url, **options)


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
