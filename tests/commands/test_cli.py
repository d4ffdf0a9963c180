"""The one command line: every subcommand's help, the version, the shared options, the exit codes (a
configuration error is 2 everywhere, a usage error UNKNOWN for the Nagios commands), and `logs -f`
across a log rotation done as supervisord does it."""

import json
import os
import re
import subprocess
import time
from importlib import metadata

import pytest

from btcfeed.commands import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "bin")
SUBCOMMANDS = ("up", "down", "status", "logs", "health", "monitor", "sync-check", "demo", "bench",
               "bench-failover", "bench-reseed", "bench-primary", "bench-backfill", "bench-health",
               "bench-parse", "bench-stream", "bench-cost", "bench-memory", "bench-move",
               "bench-availability", "bench-apply",
               "chaos", "primary", "upgrade-check", "version")
WRAPPERS = ("health", "monitor", "sync-check")
# Which command takes which of the shared options.
SHARED = {"health": ("--url", "--token-file", "--timeout", "--json"),
          "status": ("--url", "--token-file", "--timeout", "--json"),
          "monitor": ("--url", "--token-file", "--timeout"),
          "sync-check": ("--json",)}
BAD_CONFIG = {"BTCFEED_SOURCES": "foo:BAR"}


@pytest.fixture
def env(tmp_path):
    """No stack, no Redis and no health API to find: every command answers from what it is given."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("BTCFEED_")}
    clean.update(BTCFEED_STATE_DIR=str(tmp_path / "state"), BTCFEED_LOCAL_URL=f"unix://{tmp_path}/none.sock",
                 BTCFEED_PRIMARY_URL="redis://127.0.0.1:1/0", BTCFEED_HEALTH_ADDR="127.0.0.1:1")
    return clean


def run(argv, env, timeout=60):
    return subprocess.run(argv, env=env, cwd="/", capture_output=True, text=True, timeout=timeout)


def in_process(argv, command=None) -> int:
    """The exit code of one command line run here (click always exits in standalone mode)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(argv, command=command)
    return exited.value.code or 0


# --- help and version ------------------------------------------------------------------------------

def test_every_command_is_in_the_group():
    assert set(cli.cli.commands) == set(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_answers_help_under_its_name(name, capsys):
    assert in_process([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: btcfeed {name} ")
    assert "python -m" not in out


@pytest.mark.parametrize("name", WRAPPERS)
def test_each_wrapper_answers_help_under_its_own_name(name, env):
    result = run([os.path.join(BIN, name), "--help"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {name} [OPTIONS]")
    assert "python" not in result.stdout


def test_version_comes_from_the_package_metadata(env):
    expected = f"btcfeed {metadata.version('btcfeed')}\n"
    for argv in (["--version"], ["version"]):
        result = run([os.path.join(BIN, "btcfeed"), *argv], env)
        assert result.returncode == 0 and result.stdout == expected, result.stdout + result.stderr


# --- shared options --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_options_are_the_same_everywhere(name):
    command = cli.cli.commands[name]
    options = {option: param for param in command.params for option in param.opts}
    for option in SHARED[name]:
        param = options[option]
        definition = [p for p in cli.cli.commands["health"].params if option in p.opts][0]
        assert (param.name, param.help, param.default, type(param.type)) == \
            (definition.name, definition.help, definition.default, type(definition.type)), (name, option)
    missing = {o for o in ("--url", "--token-file", "--timeout", "--json") if o not in SHARED[name]}
    assert not missing & set(options), f"{name} takes {missing & set(options)} but is not listed"


def test_a_url_that_is_not_http_is_refused_by_every_command_that_takes_one(capsys):
    assert in_process(["--url", "ftp://example.com/status"], command="monitor") == 2
    assert in_process(["status", "--url", "redis://127.0.0.1:1"]) == 2
    assert in_process(["--url", "example.com:8079"], command="health") == 3
    assert capsys.readouterr().out.startswith("btcfeed UNKNOWN: usage:")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_a_positive_number_of_seconds(value, capsys):
    assert in_process(["--timeout", value], command="monitor") == 2
    assert "not a positive number of seconds" in capsys.readouterr().err
    assert in_process(["--timeout", value], command="health") == 3
    assert "not a positive number of seconds" in capsys.readouterr().out


# --- exit codes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["up"], ["down"], ["status"], ["logs", "writer"], ["health"],
                                  ["health", "--json"], ["monitor", "--once"], ["sync-check"],
                                  ["sync-check", "--json"]])
def test_a_configuration_error_is_exit_2_from_every_command(argv, env):
    result = run([os.path.join(BIN, "btcfeed"), *argv], {**env, **BAD_CONFIG})
    assert result.returncode == 2, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "configuration error: BTCFEED_SOURCES" in output and "Traceback" not in output
    if "--json" in argv:
        document = json.loads(result.stdout)
        assert document.get("exit_code") == 2 and "critical" in json.dumps(document)
    elif argv[0] in ("health", "sync-check"):
        # Monitoring reads the first line of stdout: it must carry the status of the exit code.
        assert re.match(r"^(btcfeed|SYNC-CHECK) CRITICAL", result.stdout), result.stdout
    else:
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_wrapper_gives_the_same_exit_code_for_a_configuration_error(name, env):
    result = run([os.path.join(BIN, name), *(["--once"] if name == "monitor" else [])], {**env, **BAD_CONFIG})
    assert result.returncode == 2 and "configuration error" in result.stdout + result.stderr


def test_an_unreadable_token_file_is_a_configuration_error(env, tmp_path):
    (tmp_path / "empty").write_text("\n")
    for token_file in (str(tmp_path / "missing"), str(tmp_path / "empty")):
        for argv in (["health"], ["monitor", "--once"], ["status"]):
            result = run([os.path.join(BIN, "btcfeed"), *argv, "--token-file", token_file], env)
            assert result.returncode == 2, (argv, result.stdout + result.stderr)
            assert "--token-file" in result.stdout + result.stderr


@pytest.mark.parametrize("name, first_line", [("health", "btcfeed UNKNOWN: usage:"),
                                              ("sync-check", "SYNC-CHECK UNKNOWN - usage:")])
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--json", "extra"], ["--timeout"]])
def test_a_usage_error_is_unknown_for_the_nagios_commands(name, first_line, argv, env):
    for command in ([os.path.join(BIN, name)], [os.path.join(BIN, "btcfeed"), name]):
        result = run([*command, *argv], env)
        assert result.returncode == 3, result.stdout + result.stderr
        assert result.stdout.startswith(first_line) and len(result.stdout.splitlines()) == 1, result.stdout


def test_a_usage_error_elsewhere_is_clicks_2(env):
    for argv in (["no-such-command"], ["logs", "no-such-process"], ["monitor", "--interval", "0"]):
        result = run([os.path.join(BIN, "btcfeed"), *argv], env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_up_that_cannot_start_says_why_in_one_line(env):
    result = run([os.path.join(BIN, "btcfeed"), "up"], {**env, "BTCFEED_STATE_DIR": "/proc/no-such-dir"})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("btcfeed: up failed:") and "/proc/no-such-dir" in lines[0]


def test_status_without_a_stack_is_3_as_text_and_json(env):
    text = run([os.path.join(BIN, "btcfeed"), "status"], env)
    assert text.returncode == 3 and text.stdout.startswith("btcfeed is not running")
    as_json = run([os.path.join(BIN, "btcfeed"), "status", "--json"], env)
    document = json.loads(as_json.stdout)
    assert as_json.returncode == 3 and document["running"] is False and document["exit_code"] == 3


# --- logs ------------------------------------------------------------------------------------------

def test_logs_prints_the_last_lines(env, tmp_path):
    log = tmp_path / "state" / "logs" / "writer.log"
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"line {n}\n" for n in range(100)))
    result = run([os.path.join(BIN, "btcfeed"), "logs", "writer", "-n", "3"], env)
    assert result.returncode == 0 and result.stdout == "line 97\nline 98\nline 99\n"
    missing = run([os.path.join(BIN, "btcfeed"), "logs", "ingest"], env)
    assert missing.returncode == 1 and "no log yet" in missing.stderr


def rotate(path):
    """As supervisord's rotating handler does: NAME.log becomes NAME.log.1 and a new NAME.log begins."""
    os.rename(path, f"{path}.1")
    return open(path, "ab", buffering=0)


def test_the_follower_reads_a_rotated_log_to_its_end_then_the_new_one(tmp_path):
    path = str(tmp_path / "ingest.log")
    writer = open(path, "ab", buffering=0)
    writer.write(b"before\n")
    follower = cli.LogFollower(path)
    writer.write(b"one\n")
    assert follower.read_new() == b"one\n"
    # The last line before the rotation is written after the follower's last look at the old file.
    writer.write(b"two\n")
    writer.close()
    writer = rotate(path)
    writer.write(b"three\n")
    assert follower.read_new() == b"two\nthree\n"
    writer.write(b"four\n")
    assert follower.read_new() == b"four\n"
    assert follower.read_new() == b""
    writer.close()


def read_until(stream, needle: bytes, seconds: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + seconds
    os.set_blocking(stream.fileno(), False)
    while needle not in seen and time.monotonic() < deadline:
        chunk = stream.read()
        if chunk:
            seen += chunk
        else:
            time.sleep(0.05)
    return seen


def test_logs_follow_goes_on_across_a_rotation(env, tmp_path):
    path = tmp_path / "state" / "logs" / "ingest.log"
    path.parent.mkdir(parents=True)
    writer = open(path, "ab", buffering=0)
    writer.write(b"old 1\nold 2\n")
    process = subprocess.Popen([os.path.join(BIN, "btcfeed"), "logs", "ingest", "-f", "-n", "1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = read_until(process.stdout, b"old 2\n", 15)
        writer.write(b"old 3\n")
        seen += read_until(process.stdout, b"old 3\n", 5)
        writer.close()
        writer = rotate(str(path))
        writer.write(b"new 1\n")
        seen += read_until(process.stdout, b"new 1\n", 5)
    finally:
        writer.close()
        process.terminate()
        process.wait(timeout=10)
    assert seen == b"old 2\nold 3\nnew 1\n", seen
    assert b"Traceback" not in process.stderr.read()


def test_token_file_wins_over_the_configured_token(tmp_path, monkeypatch):
    monkeypatch.setenv("BTCFEED_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("BTCFEED_HEALTH_TOKEN", "configured-token-0123456789")
    (tmp_path / "token").write_text("from-the-file-0123456789\n")
    assert cli.read_settings(None)[1] == "configured-token-0123456789"
    assert cli.read_settings(str(tmp_path / "token"))[1] == "from-the-file-0123456789"
