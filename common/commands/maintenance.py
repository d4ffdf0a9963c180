"""btcfeed primary pause | resume: planned maintenance of the primary, with no gap and no error.

pause: the writer moves to the local copy and the backlog at its next batch (state `maintenance`),
sync stops probing, /health says degraded with the reason; it lasts through restarts of any process
(the state is in the local Redis) until resume. resume: sync replays the backlog and hands back as
after a failure. Both are idempotent.
"""

import getpass
import sys
import time

import click
import redis

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.events import record_event
from btcfeed.lifecycle import EventLog
from btcfeed.storage import writerstate
from btcfeed.storage.bus import connect_local

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
HAND_BACK_WAIT_S = 600.0
# The events stream gets the record; the terminal gets the command's own line, not a log line too.
QUIET_LOG = EventLog("cli", level="ERROR", stream=sys.stderr)


def _local(cfg):
    client = connect_local(cfg.local_url)
    client.ping()
    return client


def _fail(text: str, code: int = EXIT_FAILED) -> None:
    click.echo(f"btcfeed primary: {text}", err=True)
    sys.exit(code)


def _connected():
    """(configuration, local Redis client), or one readable line and the documented exit code."""
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        _fail(f"configuration error: {exc}", EXIT_CONFIG)
    try:
        return cfg, _local(cfg)
    except redis.RedisError as exc:
        _fail(f"the local Redis does not answer ({type(exc).__name__}); is the stack up? (bin/btcfeed up)")


@click.group("primary")
def primary():
    """Planned maintenance of the primary: pause, resume."""


@primary.command()
@click.option("--reason", default="planned maintenance", show_default=True, help="Shown in /health and the events.")
def pause(reason):
    """Move the writer to the local copy now, until `btcfeed primary resume`."""
    _, local = _connected()
    found = writerstate.pause(local, reason, getpass.getuser())
    if found == writerstate.MAINTENANCE:
        click.echo("btcfeed primary: already paused; nothing changed")
        return
    record_event(local, QUIET_LOG, "cli", "maintenance_start", level="warning", reason=reason,
                 by=getpass.getuser(), was=found)
    click.echo(f"btcfeed primary: paused ({reason}); trades go to the local copy until "
               "`btcfeed primary resume`")


@primary.command()
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the backlog is replayed and the writer is back on the primary.")
def resume(wait):
    """Replay what was kept during maintenance and hand the writer back to the primary."""
    _, local = _connected()
    record = {k.decode(): v.decode() for k, v in local.hgetall(keys.WRITER_STATE).items()}
    found = writerstate.resume(local)
    if found != writerstate.MAINTENANCE:
        _fail(f"not paused (the writer is in {found}); nothing changed")
    paused_ms = int(record.get("paused_ms") or record.get("since") or 0)
    backlog = local.xlen(keys.BACKLOG)
    record_event(local, QUIET_LOG, "cli", "maintenance_end", level="warning", by=getpass.getuser(),
                 paused_s=round((time.time() * 1000 - paused_ms) / 1000, 1) if paused_ms else None,
                 backlog_entries=backlog)
    click.echo(f"btcfeed primary: resuming; {backlog} backlog entries to replay")
    if not wait:
        return
    started = time.monotonic()
    while time.monotonic() - started < HAND_BACK_WAIT_S:
        state = writerstate.read_state(local)
        if state == writerstate.PRIMARY:
            click.echo(f"btcfeed primary: the writer is back on the primary after "
                       f"{time.monotonic() - started:.1f}s")
            return
        if state == writerstate.MAINTENANCE:
            _fail("paused again meanwhile")
        time.sleep(0.05)
    _fail(f"the writer is not back on the primary after {HAND_BACK_WAIT_S:.0f}s: see bin/health")
