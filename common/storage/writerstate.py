"""The writer's state as every process and tool reads it, and the one-line reason for a primary failure.

The state lives in the local Redis (keys.WRITER_STATE) so that sync can see and change it (DESIGN.md §4):
  primary   the writer applies to the primary and keeps each batch in the local mirror;
  failover  the primary failed: the writer applies to the local copy and appends to the backlog;
  draining  as failover, while sync replays the backlog into the primary; sync hands back;
  maintenance  an operator paused the primary (`btcfeed primary pause`): as failover, but sync leaves
            the primary alone until `btcfeed primary resume`, which turns it into failover (replay,
            hand-back).
A library module, so that tools (bin/sync-check) need not import a process.
"""

import re
import time

import redis
from redis.sentinel import MasterNotFoundError

from btcfeed import keys
from btcfeed.storage.apply import is_epoch_error

PRIMARY, FAILOVER, DRAINING, MAINTENANCE = "primary", "failover", "draining", "maintenance"

# Pause and resume change the state in one step, whatever the writer and sync do meanwhile.
# KEYS[1] the writer state hash, KEYS[2] sync's wake list; ARGV: now ms, reason, who. Returns the state
# it found.
PAUSE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state') or 'primary'
if state ~= 'maintenance' then
  redis.call('HSET', KEYS[1], 'state', 'maintenance', 'since', ARGV[1], 'reason', ARGV[2], 'by', ARGV[3],
             'paused_ms', ARGV[1])
  redis.call('LPUSH', KEYS[2], 'maintenance')
  redis.call('LTRIM', KEYS[2], 0, 0)
end
return state
"""
RESUME_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state') or 'primary'
if state == 'maintenance' then
  redis.call('HSET', KEYS[1], 'state', 'failover', 'since', ARGV[1], 'reason', 'maintenance over: replaying')
end
return state
"""

# What an operator should check, by the kind of error the primary gave.
CREDENTIALS_HINT = ("the primary refused the credentials: check the user name and password in "
                    "BTCFEED_PRIMARY_URL (or BTCFEED_PRIMARY_USERNAME / BTCFEED_PRIMARY_PASSWORD[_FILE])")
ERROR_HINTS = (
    (redis.AuthenticationError, "", CREDENTIALS_HINT),
    (redis.exceptions.NoPermissionError, "", "the primary's ACL does not allow btcfeed's commands or keys"),
    (redis.exceptions.ReadOnlyError, "", "the primary is a read-only replica, not a master"),
    (redis.exceptions.OutOfMemoryError, "", "the primary is out of memory (maxmemory reached)"),
    (redis.BusyLoadingError, "", "the primary is loading its data set"),
    (redis.exceptions.MasterDownError, "", "the primary's link to its master is down"),
    (MasterNotFoundError, "", "no sentinel named a reachable master: check the sentinels and the "
                              "master name in BTCFEED_PRIMARY_URL (a Sentinel failover may be under way)"),
    (redis.ResponseError, "WRONGPASS", CREDENTIALS_HINT),
    (redis.ResponseError, "NOAUTH", CREDENTIALS_HINT),
    (redis.ResponseError, "DB index is out of range",
     "the database index in BTCFEED_PRIMARY_URL does not exist"),
)
PIPELINE_PREFIX = re.compile(r"^Command # \d+ \(.*?\) of pipeline caused error: ")


EPOCH_HINT = ("the primary lost btcfeed's data (flushed, restarted empty, or a replica that never had it): "
              "the local copy re-seeds it")


def describe_error(exc: Exception, url: str = "") -> str:
    """A one-line reason for a primary failure with what to check, never containing credentials."""
    text = PIPELINE_PREFIX.sub("", str(exc).splitlines()[0] if str(exc) else "")
    if is_epoch_error(exc):
        return f"epoch refused: {text[:160]} — {EPOCH_HINT}"
    if isinstance(exc, MasterNotFoundError):
        text = text.split(" : ")[0]          # the rest is the repr of every sentinel client
    reason = f"{type(exc).__name__}: {text[:160]}"
    for kind, needle, hint in ERROR_HINTS:
        if isinstance(exc, kind) and needle in text:
            return f"{reason} — {hint}"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return (f"{reason} — the primary's TLS certificate was not accepted: give its CA certificate "
                "with BTCFEED_PRIMARY_TLS_CA_FILE (and check the host name in BTCFEED_PRIMARY_URL)")
    if url.startswith("rediss://") and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return f"{reason} — TLS (rediss://) handshake did not complete: is that port serving TLS?"
    return reason


def read_state(client) -> str:
    state = client.hget(keys.WRITER_STATE, "state")
    return state.decode() if state else PRIMARY


def pause(client, reason: str, who: str) -> str:
    """Put the writer in maintenance (idempotent); returns the state it was in."""
    found = client.eval(PAUSE_SCRIPT, 2, keys.WRITER_STATE, keys.SYNC_WAKE, int(time.time() * 1000),
                        reason, who)
    return found.decode() if isinstance(found, bytes) else found


def resume(client) -> str:
    """End maintenance: sync replays the backlog and hands back as after a failure; returns the state
    it found (anything but maintenance means there was nothing to resume)."""
    found = client.eval(RESUME_SCRIPT, 1, keys.WRITER_STATE, int(time.time() * 1000))
    return found.decode() if isinstance(found, bytes) else found


def set_state(client, state: str, reason: str) -> None:
    """Change the state and wake sync (wait_for_change) in the same transaction."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.WRITER_STATE,
                  mapping={"state": state, "since": int(time.time() * 1000), "reason": reason})
        pipe.lpush(keys.SYNC_WAKE, state)
        pipe.ltrim(keys.SYNC_WAKE, 0, 0)
        pipe.execute()


def wait_for_change(client, timeout_s: float) -> None:
    """Block until set_state or pause changes the state, or for timeout_s."""
    client.blpop([keys.SYNC_WAKE], timeout=timeout_s)
