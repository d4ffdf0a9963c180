"""What every btcfeed process shares: configuration, one-line event logs, signals, heartbeat, loop."""

import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime, timezone

import redis

from btcfeed import config as config_module
from btcfeed.storage.bus import connect_local, wait_for_local, write_heartbeat

HEARTBEAT_INTERVAL_S = 1.0
LOCAL_WAIT_AT_START_S = 5.0
LOOP_ERROR_PAUSE_S = 0.5
EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class EventLog:
    """One line per event: time, process, level, event name, then key=value fields (or JSON)."""

    def __init__(self, process: str, fmt: str = "kv", level: str = "INFO", stream=None):
        self.process = process
        self.fmt = fmt
        self.level = logging.getLevelName(level) if isinstance(level, str) else level
        if not isinstance(self.level, int):
            self.level = logging.INFO
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def debug(self, event, **fields):
        self._write(logging.DEBUG, event, fields)

    def info(self, event, **fields):
        self._write(logging.INFO, event, fields)

    def warning(self, event, **fields):
        self._write(logging.WARNING, event, fields)

    def error(self, event, **fields):
        self._write(logging.ERROR, event, fields)

    def _write(self, level, event, fields):
        if level < self.level:
            return
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        record = {"time": now, "proc": self.process, "level": logging.getLevelName(level), "event": event}
        record.update(fields)
        if self.fmt == "json":
            line = json.dumps(record, default=str)
        else:
            line = " ".join(f"{k}={_kv_value(v)}" for k, v in record.items())
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()


def _kv_value(value) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class Process:
    """A supervised process: initialize() once, loop_once(now) until stopped, shutdown() at the end."""

    name = "process"
    # Whether the process is useless without the local Redis (health is not: it reports the outage).
    needs_local = True

    def __init__(self, config, log: EventLog):
        self.config = config
        self.log = log
        self.stopping = threading.Event()
        self.local = connect_local(config.local_url)
        self._next_heartbeat = 0.0

    def validate(self) -> None:
        """Refuse a configuration this process cannot run with (raise ConfigError), before any wait."""

    def initialize(self) -> None:
        pass

    def loop_once(self, now: float) -> None:
        self.stopping.wait(1.0)

    def shutdown(self) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def heartbeat(self, now: float) -> None:
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_INTERVAL_S
        try:
            write_heartbeat(self.local, self.name, self.stats())
        except redis.RedisError as exc:
            self.log.warning("heartbeat_failed", error=type(exc).__name__)

    def request_stop(self, signum=None, frame=None) -> None:
        # Only set a flag here: logging from a signal handler can deadlock on the stream lock.
        self.stopping.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.validate()
        try:
            wait_for_local(self.local, LOCAL_WAIT_AT_START_S)
        except redis.RedisError as exc:
            self.log.error("local_redis_unreachable", url=config_module.redact_url(self.config.local_url), error=str(exc))
            if self.needs_local:
                return EXIT_FAILURE
        self.initialize()
        self.log.info("started")
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                self.heartbeat(now)
                try:
                    self.loop_once(now)
                except redis.RedisError as exc:
                    # The loop's own handling missed it: say so, pause, and go on.
                    self.log.error("loop_error", error=f"{type(exc).__name__}: {str(exc)[:200]}")
                    self.stopping.wait(LOOP_ERROR_PAUSE_S)
        finally:
            self.shutdown()
            self.log.info("stopped")
        return EXIT_OK


def run_process(process_class, argv=None) -> int:
    """main() of a process: configuration errors are one readable line and exit code 2."""
    try:
        cfg = config_module.load()
    except config_module.ConfigError as exc:
        print(f"{process_class.name}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    log = EventLog(process_class.name, cfg.log_format, cfg.log_level)
    try:
        return process_class(cfg, log).run()
    except config_module.ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        return EXIT_CONFIG
