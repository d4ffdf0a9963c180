"""btcfeed primary pause | resume | move: planned maintenance of the primary, with no gap and no error.

pause: the writer moves to the local copy and the backlog at its next batch (state `maintenance`),
sync stops probing, /health says degraded with the reason; it lasts through restarts of any process
(the state is in the local Redis) until resume. resume: sync replays the backlog and hands back as
after a failure. Both are idempotent.

move --to URL: copies the window into the new primary while the feed goes on, pauses for the last
seconds of it, records the new primary in the state dir (the processes that use the primary restart on
it), and resumes there (common/storage/move.py). The old primary is left as it was.
"""

import getpass
import os
import sys
import time

import click
import redis

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.events import record_event
from btcfeed.lifecycle import EventLog
from btcfeed.storage import move as moving, writerstate
from btcfeed.storage.apply import BatchApplier
from btcfeed.storage.bus import connect_local, read_heartbeats
from btcfeed.storage.primary import NotWritable, connect_primary, is_cluster, probe

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
HAND_BACK_WAIT_S = 600.0
MOVE_TIMEOUT_MS = 5000          # the copy sends big pipelines, like sync's replay
PROCESS_WAIT_S = 60.0           # for the writer to pause, the held index to catch up, processes to restart
USING_PRIMARY = ("writer", "sync")
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
    """Planned maintenance of the primary: pause, resume, move."""


@primary.command()
@click.option("--reason", default="planned maintenance", show_default=True,
              help="Shown in /health and the events.")
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


@primary.command()
@click.option("--to", "url", metavar="URL", help="The new primary (redis://, rediss://, redis+sentinel://, "
              "redis+cluster://, unix://).")
@click.option("--tls-ca-file", default="", help="For rediss://: the CA to verify the new primary with.")
@click.option("--tls-cert-file", default="", help="For rediss://: a client certificate.")
@click.option("--tls-key-file", default="", help="For rediss://: the client certificate's key.")
@click.option("--username", default="", help="The new primary's user, when not in the URL.")
@click.option("--password-file", default="",
              help="A file holding the new primary's password, when not in the URL.")
@click.option("--abort", is_flag=True,
              help="Give up a move that has not switched yet: the feed stays on the old primary.")
def move(url, tls_ca_file, tls_cert_file, tls_key_file, username, password_file, abort):
    """Move the feed to a new primary with no gap: copy the window, switch, resume there."""
    cfg, local = _connected()
    record = moving.read_record(local)
    if abort:
        return _abort(local, record)
    if not url:
        _fail("give the new primary with --to URL (or --abort)", EXIT_CONFIG)
    if record.get("phase") in moving.UNDER_WAY and moving.owner_alive(record):
        _fail(f"a move to {record.get('to')} is under way (pid {record.get('pid')}); nothing changed")
    if record.get("phase") == moving.COMMITTED:
        _fail(f"the move to {record.get('to')} was recorded already and is finishing; nothing changed")
    settings = {"primary_url": url, "primary_username": username, "primary_password_file": password_file,
                "primary_tls_ca_file": tls_ca_file, "primary_tls_cert_file": tls_cert_file,
                "primary_tls_key_file": tls_key_file}
    target_cfg = _target_config(settings)
    target = _reachable(cfg, target_cfg)
    _Move(cfg, local, target_cfg, target, settings).run()


def _target_config(settings: dict):
    """The configuration with the new primary, checked as any configuration is."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("BTCFEED_PRIMARY_")
               or k.upper()[8:].lower() not in config_module.PRIMARY_SETTINGS}
    environ.pop("BTCFEED_PRIMARY_PASSWORD", None)
    environ.update({"BTCFEED_" + name.upper(): value for name, value in settings.items()})
    try:
        return config_module.load(environ, primary_override=False)
    except config_module.ConfigError as exc:
        _fail(f"the new primary: {exc}", EXIT_CONFIG)


def _reachable(cfg, target_cfg):
    """A client of the new primary, once it answered as a writable master that is not the current one."""
    target = connect_primary(target_cfg, MOVE_TIMEOUT_MS)
    sources = [source.name for source in cfg.sources]
    where = config_module.redact_url(target_cfg.primary_url)
    try:
        identity = probe(target, is_cluster(target_cfg), sources)
    except NotWritable as exc:
        _fail(f"{where}: {exc}; nothing changed")
    except redis.RedisError as exc:
        _fail(f"{where} does not take writes: {writerstate.describe_error(exc, target_cfg.primary_url)}; "
              "nothing changed")
    try:
        current = probe(connect_primary(cfg, cfg.primary_timeout_ms), is_cluster(cfg), sources)
    except redis.RedisError:
        current = {}            # the old primary is down: moving away from it is what the command is for
    if identity.get("run_id") and identity.get("run_id") == current.get("run_id"):
        _fail(f"{where} is the primary the feed uses now; nothing changed")
    return target


def _abort(local, record: dict) -> None:
    phase = record.get("phase")
    if phase not in moving.UNDER_WAY:
        _fail("no move is under way; nothing changed")
    if phase == moving.COMMITTED:
        _fail(f"the move to {record.get('to')} is recorded already and finishes by itself; to go back, "
              "move again to the old primary")
    if moving.owner_alive(record) and int(record.get("pid", 0)) != os.getpid():
        _fail(f"the move is running (pid {record.get('pid')}): stop that command first (Ctrl-C aborts it)")
    if record.get("paused") == "1" and record.get("was") != writerstate.MAINTENANCE:
        writerstate.resume(local)
    moving.set_phase(local, moving.ABANDONED, abandoned_by=getpass.getuser())
    record_event(local, QUIET_LOG, "cli", "move_abandoned", level="warning", to=record.get("to"),
                 by=getpass.getuser())
    click.echo("btcfeed primary: move abandoned; the feed stays on the old primary")


class _Move:
    """The steps of one move; any failure before the switch leaves the feed on the old primary."""

    def __init__(self, cfg, local, target_cfg, target, settings: dict):
        self.cfg, self.local, self.settings = cfg, local, settings
        self.target_cfg, self.target = target_cfg, target
        self.sources = [source.name for source in cfg.sources]
        self.to = config_module.redact_url(target_cfg.primary_url)
        self.by = getpass.getuser()
        self.started = time.monotonic()

    def run(self) -> None:
        moving.start_record(self.local, self.to, self.by)
        record_event(self.local, QUIET_LOG, "cli", "move_start", level="warning", to=self.to, by=self.by,
                     was=config_module.redact_url(self.cfg.primary_url))
        try:
            self.applier = self._applier()
            copied = self._copy("copy")
            paused_at = time.monotonic()
            self._pause()
            copied += self._copy("catch-up")
        except KeyboardInterrupt:
            self._abandon("interrupted")
        except (redis.RedisError, TimeoutError) as exc:
            self._abandon(writerstate.describe_error(exc, self.target_cfg.primary_url)
                          if isinstance(exc, redis.RedisError) else str(exc))
        try:
            self._commit()
            self._resume()
        except (redis.RedisError, TimeoutError) as exc:
            # The new primary is recorded: the processes restart on it, and sync resumes the feed there
            # once this command is gone.
            _fail(f"the move to {self.to} is recorded and finishes by itself ({str(exc)[:160]}); "
                  "see bin/health and the events")
        pause_s = time.monotonic() - paused_at
        seconds = time.monotonic() - self.started
        moving.set_phase(self.local, moving.DONE, copied=copied, seconds=round(seconds, 1))
        record_event(self.local, QUIET_LOG, "cli", "primary_moved", level="warning", to=self.to, by=self.by,
                     trades_copied=copied, seconds=round(seconds, 1), paused_s=round(pause_s, 1))
        click.echo(f"btcfeed primary: moved to {self.to} in {seconds:.1f}s ({copied} trades copied; the "
                   f"writer was on the local copy for {pause_s:.1f}s)")
        override = config_module.primary_override_path(self.cfg.state_dir)
        click.echo(f"btcfeed primary: the new primary is kept in {override},"
                   " which wins over BTCFEED_PRIMARY_URL; put the new URL in the service's configuration "
                   "(e.g. /etc/btcfeed/btcfeed.env or BTCFEED_CONFIG) and delete that file")

    def _applier(self) -> BatchApplier:
        held = moving.new_primary_epochs(self.target, self.sources)
        return BatchApplier(self.target, self.cfg.retention_ms, None, self.cfg.compat_history_len,
                            epochs=held)

    def _copy(self, what: str) -> int:
        def progress(source, done, total, copied):
            if done == total or done % 160 == 0:
                click.echo(f"btcfeed primary: {what} {source}: {done}/{total} segments, {copied} trades")
        copied = moving.copy_window(self.local, self.target, self.sources, self.applier, progress)
        self.local.hincrby(keys.MOVE, "copied", copied)
        return copied

    def _step(self, what: str) -> None:
        """One line per step, with the time since the previous one: where a slow move spends it."""
        now = time.monotonic()
        click.echo(f"btcfeed primary: {what} (+{now - getattr(self, 'last_step', self.started):.1f}s)")
        self.last_step = now

    def _pause(self) -> None:
        """The writer on the local copy, and everything it wrote before in the held index."""
        self._step("window copied; pausing the writer for the last seconds")
        moving.set_phase(self.local, moving.SWITCHING)
        found = writerstate.pause(self.local, f"moving the primary to {self.to}", self.by)
        # Paused by the move only when it was not paused already: then resuming is the move's to do.
        self.local.hset(keys.MOVE, mapping={"paused": 1, "was": found})
        _wait(lambda: self._heartbeat("writer").get("state") == writerstate.MAINTENANCE,
              "the writer to move to the local copy")
        self._step("the writer is on the local copy")
        ends = moving.local_copy_ends(self.local, self.sources)
        _wait(lambda: moving.index_caught_up(self.local, ends),
              "sync's held index to take in the last batches")
        self._step("sync's held index has every batch")

    def _commit(self) -> None:
        """From here on the move finishes, whatever happens: the new primary is recorded."""
        path = config_module.write_primary_override(self.cfg.state_dir, self.settings)
        self.local.hset(keys.EPOCHS, mapping=self.applier.epochs)
        self.local.hdel(keys.SYNC_PRIMARY, "run_id")
        moving.set_phase(self.local, moving.COMMITTED, file=path)
        self._step(f"the new primary is recorded in {path}")
        _wait(lambda: all(self._heartbeat(name).get("primary") == self.to for name in USING_PRIMARY),
              "the writer and sync to restart on the new primary")

    def _resume(self) -> None:
        self._step("the writer and sync run on the new primary; resuming")
        writerstate.resume(self.local)
        _wait(lambda: writerstate.read_state(self.local) == writerstate.PRIMARY,
              "the writer to hand back to the new primary", HAND_BACK_WAIT_S)

    def _heartbeat(self, process: str) -> dict:
        return read_heartbeats(self.local, [process])[process] or {}

    def _abandon(self, reason: str) -> None:
        """Back to where the move started: the feed on the old primary (resumed if the move paused it)."""
        record = moving.read_record(self.local)
        if record.get("paused") == "1" and record.get("was") != writerstate.MAINTENANCE:
            writerstate.resume(self.local)
        moving.set_phase(self.local, moving.ABANDONED, reason=reason[:200])
        record_event(self.local, QUIET_LOG, "cli", "move_abandoned", level="warning", to=self.to,
                     reason=reason[:200])
        _fail(f"move abandoned, the feed stays on the old primary: {reason}")


def _wait(predicate, what: str, timeout_s: float = PROCESS_WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.05)
