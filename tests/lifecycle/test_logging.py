"""Every record a btcfeed process logs is one line in the project's format (time, proc, level, event,
then key=value fields; one JSON object with BTCFEED_LOG_FORMAT=json): its own events, another
library's records, captured warnings and uncaught exceptions in any thread (the traceback in one
field). The level setting applies to all of them and no secret is written. Each case runs in a
fresh interpreter, as a process would, since the log takes over the process's hooks."""

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading

import pytest
import redis

from btcfeed.events import record_event
from btcfeed.lifecycle import EventLog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECRET = "pw-Lq93SecretInTheLog"
KV_LINE = re.compile(r'^time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z proc=demo '
                     r'level=(DEBUG|INFO|WARNING|ERROR) event=([a-z_]+|"(?:[^"\\]|\\.)*")( |$)')
PRELUDE = f"""
import logging, sys, threading, warnings
from btcfeed.lifecycle import EventLog
log = EventLog("demo", sys.argv[1], sys.argv[2], secrets=[{SECRET!r}], capture=True)
"""


def run(body: str, fmt: str = "kv", level: str = "INFO"):
    """(stdout lines, stderr, exit code) of the body run after a process log was set up."""
    code = PRELUDE + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", code, fmt, level], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    return result.stdout.splitlines(), result.stderr, result.returncode


def only_line(lines: list, fmt: str):
    assert len(lines) == 1, lines
    if fmt == "json":
        record = json.loads(lines[0])
        assert {"time", "proc", "level", "event"} <= set(record) and record["proc"] == "demo"
        return record
    assert KV_LINE.match(lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_a_third_party_record_is_one_line_naming_its_library(fmt):
    lines, err, code = run("""
        logging.getLogger("urllib3.connectionpool").warning(
            "Connection pool is full, discarding connection: %s", "api.binance.com")
    """, fmt)
    record = only_line(lines, fmt)
    assert code == 0 and err == ""
    if fmt == "json":
        assert record["event"] == "Connection pool is full, discarding connection: api.binance.com"
        assert record["logger"] == "urllib3.connectionpool" and record["level"] == "WARNING"
    else:
        assert 'event="Connection pool is full, discarding connection: api.binance.com" ' in record
        assert record.endswith(" logger=urllib3.connectionpool")


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_an_uncaught_exception_in_a_thread_is_one_line_with_its_traceback(fmt):
    lines, err, code = run("""
        def fail():
            raise RuntimeError("cannot go on\\nwith " + "pw-Lq93SecretInTheLog")
        thread = threading.Thread(target=fail, name="feed:binance")
        thread.start()
        thread.join()
    """, fmt)
    record = only_line(lines, fmt)
    assert code == 0 and err == "" and SECRET not in lines[0]
    if fmt == "json":
        assert record["event"] == "uncaught_exception" and record["thread"] == "feed:binance"
        assert record["level"] == "ERROR" and record["error"] == "RuntimeError: cannot go on\nwith ***"
        assert record["traceback"].startswith("Traceback (most recent call last):")
        assert "in fail" in record["traceback"]
    else:
        assert "event=uncaught_exception thread=feed:binance " in record
        assert 'traceback="Traceback (most recent call last):\\n' in record


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_an_uncaught_exception_in_the_main_thread_is_one_line(fmt):
    lines, err, code = run("""
        log.info("started")
        raise ValueError("bad state")
    """, fmt)
    assert code == 1 and err == "" and len(lines) == 2
    record = only_line(lines[1:], fmt)
    if fmt == "json":
        assert record["event"] == "uncaught_exception" and record["error"] == "ValueError: bad state"
    else:
        assert "event=uncaught_exception thread=MainThread " in record and "ValueError: bad state" in record


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_a_warning_is_one_line(fmt):
    lines, err, code = run("""
        warnings.warn("the old setting is ignored", UserWarning)
    """, fmt)
    record = only_line(lines, fmt)
    assert code == 0 and err == ""
    if fmt == "json":
        assert record["logger"] == "py.warnings" and record["level"] == "WARNING"
        assert "UserWarning: the old setting is ignored" in record["event"]
    else:
        assert "UserWarning: the old setting is ignored" in record and record.endswith(" logger=py.warnings")


def test_the_level_applies_to_every_logger():
    body = """
        logging.getLogger("redis.connection").debug("a detail")
        logging.getLogger("websocket").info("a note")
        log.debug("own_detail")
        log.warning("own_warning")
    """
    lines, _, _ = run(body, level="WARNING")
    assert len(lines) == 1 and "event=own_warning" in lines[0]
    lines, _, _ = run(body, level="DEBUG")
    assert len(lines) == 4 and all(KV_LINE.match(line) for line in lines)
    assert lines[0].endswith(' event="a detail" logger=redis.connection')
    assert lines[1].endswith(' event="a note" logger=websocket')
    assert "event=own_detail" in lines[2] and "event=own_warning" in lines[3]


def test_own_events_keep_their_fields_and_lose_their_secrets():
    lines, _, _ = run(f"""
        log.info("connected", url="redis://:{SECRET}@10.0.0.5:6379/0", count=3, note="two words")
        log.warning("event_not_recorded", name="failover", level="shadowed")
    """)
    assert lines[0].endswith("event=connected url=redis://:***@10.0.0.5:6379/0 count=3 note=\"two words\"")
    assert lines[1].endswith("event=event_not_recorded name=failover field_level=shadowed")
    assert " level=WARNING " in lines[1]


def test_a_log_on_a_buffer_takes_only_its_own_events():
    """A test's EventLog on a buffer leaves the interpreter's logging and hooks alone."""
    hooks = (sys.excepthook, threading.excepthook)
    buffer = io.StringIO()
    log = EventLog("demo", stream=buffer)
    log.info("own", n=1)
    logging.getLogger("elsewhere").warning("not for this buffer")
    assert KV_LINE.match(buffer.getvalue()) and buffer.getvalue().count("\n") == 1
    assert (sys.excepthook, threading.excepthook) == hooks


def test_a_btcfeed_program_logging_to_stderr_takes_its_uncaught_exception():
    """The event listener makes its own log on stderr (stdout speaks supervisord's protocol): run
    outside supervisord it fails at once, and says so in one line of its own log."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SUPERVISOR_")}
    result = subprocess.run([sys.executable, "-m", "btcfeed.processes.listener"], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and result.stdout == "" and len(lines) == 1, result.stderr
    assert " proc=listener level=ERROR event=uncaught_exception thread=MainThread " in lines[0]
    assert "KeyError: 'SUPERVISOR_SERVER_URL'" in lines[0]


def test_an_event_the_local_redis_cannot_take_is_still_logged():
    """record_event keeps the log line when Redis is down, and says which event was not recorded."""
    class DownRedis:
        def xadd(self, *args, **kwargs):
            raise redis.ConnectionError("down")

    buffer = io.StringIO()
    record_event(DownRedis(), EventLog("writer", stream=buffer), "writer", "failover", reason="primary down")
    lines = buffer.getvalue().splitlines()
    assert lines[0].endswith('event=failover reason="primary down"')
    assert lines[1].endswith("level=WARNING event=event_not_recorded name=failover")
