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


# The attribute a btcfeed event's key=value fields ride on through the logging module.
FIELDS_ATTR = "btcfeed_fields"
# The names the line is built from; a field by one of these names must not overwrite them.
HEADER_KEYS = ("time", "proc", "level", "event")


class LineFormatter(logging.Formatter):
    """Every record as the project's one line: time, process, level, event, then key=value fields
    (or one JSON object). A btcfeed event's name is the event; another library's message is, with
    logger= naming the library. A traceback is one field (json-escaped), never lines of its own,
    and every secret is replaced before anything is written."""

    def __init__(self, process: str, fmt: str = "kv", secrets=()):
        super().__init__()
        self.process = process
        self.json = fmt == "json"
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        try:
            fields = self._fields(record)
        except Exception as exc:   # a third-party record whose arguments do not format: say so, in one line
            fields = {"event": "unformattable_log_record", "logger": record.name,
                      "msg": str(record.msg)[:500], "error": _exception_text(exc)}
        line = {"time": _utc_ms(record.created), "proc": self.process, "level": record.levelname}
        line.update((key, self._clean(value)) for key, value in fields.items())
        if self.json:
            return json.dumps(line)
        return " ".join(f"{key}={_kv_value(value)}" for key, value in line.items())

    def _fields(self, record: logging.LogRecord) -> dict:
        own = getattr(record, FIELDS_ATTR, None)
        if own is not None:
            fields = {"event": record.msg}
            fields.update((f"field_{key}" if key in HEADER_KEYS else key, value)
                          for key, value in own.items())
        else:
            fields = {"event": record.getMessage().strip(), "logger": record.name}
        if record.exc_info and record.exc_info[0] is not None:
            fields.setdefault("error", _exception_text(record.exc_info[1]))
            fields["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = record.stack_info
        return fields

    def _clean(self, value):
        if value is None or isinstance(value, (bool, int, float)):
            return value
        # Lists and dicts stay structured (JSON objects in json mode), their contents cleaned.
        if isinstance(value, dict):
            return {str(key): self._clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(item) for item in value]
        text = value if isinstance(value, str) else str(value)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def _utc_ms(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _kv_value(value) -> str:
    text = str(value)
    if not text or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


def _exception_text(exc) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class EventLog:
    """One line per event (`log.info("event_name", key=value, ...)`) through a logging.Logger and
    LineFormatter. With capture, it is the process's log: its handler also takes every other record
    (third-party loggers, captured warnings, uncaught exceptions in any thread) and its level
    applies to all of them. capture=None means: when a btcfeed program (python -m btcfeed....) logs
    to its own stdout or stderr, so that a log made inside another program (a test, a tool) leaves
    that program's logging and hooks alone."""

    def __init__(self, process: str, fmt: str = "kv", level: str = "INFO", stream=None, secrets=(),
                 capture=None):
        self.process = process
        self.fmt = fmt
        self.level = logging.getLevelName(level) if isinstance(level, str) else level
        if not isinstance(self.level, int):
            self.level = logging.INFO
        self.stream = stream or sys.stdout
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(LineFormatter(process, fmt, secrets))
        # Its own Logger, outside the logging tree: two EventLogs of one name never share a stream.
        self.logger = logging.Logger(f"btcfeed.{process}", self.level)
        self.logger.propagate = False
        self.logger.addHandler(self.handler)
        if capture is None:
            capture = _in_btcfeed_program() and self.stream in (sys.stdout, sys.stderr)
        if capture:
            self._take_all_records()

    def debug(self, event, **fields):
        self._write(logging.DEBUG, event, fields)

    def info(self, event, **fields):
        self._write(logging.INFO, event, fields)

    def warning(self, event, **fields):
        self._write(logging.WARNING, event, fields)

    def error(self, event, **fields):
        self._write(logging.ERROR, event, fields)

    def _write(self, level, event, fields):
        if self.logger.isEnabledFor(level):
            self.logger.log(level, event, extra={FIELDS_ATTR: fields})

    def _take_all_records(self) -> None:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h.formatter, LineFormatter)]:
            root.removeHandler(handler)         # an earlier process log in this interpreter
        root.addHandler(self.handler)
        root.setLevel(self.level)
        logging.captureWarnings(True)
        sys.excepthook = self._uncaught
        threading.excepthook = self._uncaught_in_thread

    def _uncaught(self, exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        self.logger.error("uncaught_exception", exc_info=(exc_type, exc, tb),
                          extra={FIELDS_ATTR: {"thread": threading.current_thread().name}})

    def _uncaught_in_thread(self, args) -> None:
        if issubclass(args.exc_type, SystemExit):
            return                              # as threading's own hook: a thread may end that way
        thread = args.thread.name if args.thread is not None else "unknown"
        self.logger.error("uncaught_exception", exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
                          extra={FIELDS_ATTR: {"thread": thread}})


def _in_btcfeed_program() -> bool:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.startswith("btcfeed.")


class Process:
    """A supervised process: initialize() once, loop_once(now) until stopped, shutdown() at the end."""

    name = "process"
    # Whether the process is useless without the local Redis (health is not: it reports the outage).
    needs_local = True
    # Whether the process talks to the primary: it then restarts (supervisord starts it again) when
    # `btcfeed primary move` records another primary, and never writes to the one it moved away from.
    uses_primary = False

    def __init__(self, config, log: EventLog):
        self.config = config
        self.log = log
        self.stopping = threading.Event()
        self.client_name = f"btcfeed-{self.name}"
        self.local = connect_local(config.local_url, name=self.client_name)
        self._next_heartbeat = 0.0
        self._override = config_module.primary_override_path(config.state_dir)
        self._override_stamp = config_module.primary_override_stamp(self._override)

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
        if self.uses_primary and config_module.primary_override_stamp(self._override) != self._override_stamp:
            self.log.warning("primary_moved_restarting", file=self._override)
            self.stopping.set()
            return
        stats = self.stats()
        if self.uses_primary:
            stats["primary"] = config_module.redact_url(self.config.primary_url)
        try:
            write_heartbeat(self.local, self.name, stats)
        except redis.RedisError as exc:
            self.log.warning("heartbeat_failed", error=type(exc).__name__)

    def _unblock_when_stopping(self) -> None:
        """A stop ends this process's blocking reads of the local Redis at once (CLIENT UNBLOCK on its
        own connections, found by name), so that idle reads may block for a second without making a
        stop, a restart or `btcfeed down` wait for them. It looks again every 50 ms until the process
        has exited (it is a daemon thread), for a read that starts after the stop was asked."""
        self.stopping.wait()
        try:
            client = connect_local(self.config.local_url, timeout_s=1.0)
            try:
                while True:
                    for entry in client.client_list():
                        if entry.get("name") == self.client_name and "b" in entry.get("flags", ""):
                            client.client_unblock(entry["id"])
                    time.sleep(0.05)
            finally:
                client.close()
        except redis.RedisError:
            pass            # the local Redis is gone: nothing is blocked on it

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
            self.log.error("local_redis_unreachable", url=config_module.redact_url(self.config.local_url),
                           error=str(exc))
            if self.needs_local:
                return EXIT_FAILURE
        self.initialize()
        threading.Thread(target=self._unblock_when_stopping, name="stop-unblock", daemon=True).start()
        self.log.info("started", **({"primary_from": self.config.primary_override}
                                    if self.uses_primary and self.config.primary_override else {}))
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
    log = EventLog(process_class.name, cfg.log_format, cfg.log_level, secrets=config_module.secrets_of(cfg),
                   capture=True)
    try:
        return process_class(cfg, log).run()
    except config_module.ConfigError as exc:
        log.error("configuration_error", error=str(exc))
        return EXIT_CONFIG
