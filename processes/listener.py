"""listener: a supervisord event listener that records process state changes and brings back
processes that reached FATAL.

supervisord gives up on a process that failed to start `startretries` times (FATAL) and never
tries again by itself; a feed that must not lose trades cannot stay that way until someone
notices. The listener restarts it with a growing pause (so a process that cannot start does not
spin) and raises an alarm event each time. Every PROCESS_STATE change goes to the events stream
(and so to /status and bin/monitor); crash restarts are counted per process.

stdout is the event protocol channel; the log goes to stderr.
"""

import os
import sys
import threading
import time
import xmlrpc.client

import redis
from supervisor import childutils

from btcfeed import config as config_module
from btcfeed import keys
from btcfeed.storage.bus import connect_local
from btcfeed.events import record_event
from btcfeed.lifecycle import EXIT_CONFIG, EventLog

FIRST_RESTART_DELAY_S = 2.0
MAX_RESTART_DELAY_S = 300.0
# A process that stays RUNNING this long after a FATAL restart is considered well again.
HEALTHY_AFTER_S = 60.0
CRASH_STARTS = ("EXITED", "BACKOFF", "FATAL")      # STARTING from these is a restart after a failure
STATE_LEVELS = {"FATAL": "error", "BACKOFF": "warning", "EXITED": "warning", "UNKNOWN": "error"}


class Listener:
    name = "listener"

    def __init__(self, config, log: EventLog, rpc):
        self.config = config
        self.log = log
        self.rpc = rpc
        self.local = connect_local(config.local_url, timeout_s=2.0)
        self.delays = {}            # process -> pause before the next FATAL restart
        self.running_since = {}     # process -> monotonic time it last became RUNNING
        self.pending = {}           # process -> threading.Timer of a scheduled restart

    # --- events ------------------------------------------------------------------------------------
    def handle(self, headers: dict, payload: str) -> None:
        event = headers.get("eventname", "")
        if event.startswith("TICK"):
            self._forget_old_failures()
            return
        if not event.startswith("PROCESS_STATE_"):
            return
        fields, _ = _payload_fields(payload)
        process, to_state = fields.get("processname", "?"), event[len("PROCESS_STATE_"):]
        from_state = fields.get("from_state", "?")
        if to_state == "EXITED" and fields.get("expected") == "1":
            level = "info"
        else:
            level = STATE_LEVELS.get(to_state, "info")
        self._record(level, "process_state", program=process, to=to_state, **{"from": from_state},
                     **{k: fields[k] for k in ("pid", "expected") if k in fields})
        if to_state == "STARTING" and from_state in CRASH_STARTS:
            self._count_restart(process)
        if to_state == "RUNNING":
            self.running_since[process] = time.monotonic()
        elif to_state == "FATAL":
            self._schedule_restart(process)

    def _schedule_restart(self, process: str) -> None:
        delay = self.delays.get(process, FIRST_RESTART_DELAY_S)
        self.delays[process] = min(delay * 2, MAX_RESTART_DELAY_S)
        self.running_since.pop(process, None)
        self._record("error", "process_fatal", program=process, restart_in_s=delay,
                     note="supervisord gave up on it; the listener restarts it")
        previous = self.pending.pop(process, None)
        if previous is not None:
            previous.cancel()
        timer = threading.Timer(delay, self._restart, args=(process,))
        timer.daemon = True
        self.pending[process] = timer
        timer.start()

    def _restart(self, process: str) -> None:
        self.pending.pop(process, None)
        try:
            state = self.rpc.supervisor.getProcessInfo(process)["statename"]
            if state != "FATAL":
                return          # someone (an operator, a new deploy) acted meanwhile
            self.rpc.supervisor.startProcess(process, False)
            self._record("warning", "process_restarted", program=process, by="listener")
        except (OSError, xmlrpc.client.Error) as exc:
            self._record("error", "process_restart_failed", program=process,
                         error=f"{type(exc).__name__}: {exc}")

    def _forget_old_failures(self) -> None:
        now = time.monotonic()
        for process, since in list(self.running_since.items()):
            if now - since >= HEALTHY_AFTER_S:
                self.delays.pop(process, None)
                del self.running_since[process]

    # --- local Redis (best effort: the listener keeps restarting processes without it) ---------
    def _record(self, level: str, event: str, **fields) -> None:
        record_event(self.local, self.log, self.name, event, level=level, **fields)

    def _count_restart(self, process: str) -> None:
        try:
            self.local.hincrby(keys.PROCESS_RESTARTS, process, 1)
        except redis.RedisError as exc:
            self.log.warning("restart_not_counted", program=process, error=type(exc).__name__)


def _payload_fields(payload: str):
    """PROCESS_STATE payloads are 'key:value key:value' on the first line (no data after it)."""
    head, _, rest = payload.partition("\n")
    return dict(item.split(":", 1) for item in head.split() if ":" in item), rest


def main(argv=None) -> int:
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        print(f"listener: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log = EventLog("listener", cfg.log_format, cfg.log_level, stream=sys.stderr)
    listener = Listener(cfg, log, childutils.getRPCInterface(os.environ))
    log.info("started")
    while True:
        childutils.listener.ready(sys.stdout)
        line = sys.stdin.readline()
        if not line:
            return 0            # supervisord closed the channel: it is shutting down
        headers = childutils.get_headers(line)
        payload = sys.stdin.read(int(headers["len"]))
        try:
            listener.handle(headers, payload)
        except Exception as exc:   # one bad event must not take the listener (and its restarts) down
            log.error("event_failed", eventname=headers.get("eventname"),
                      error=f"{type(exc).__name__}: {exc}")
        childutils.listener.ok(sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
