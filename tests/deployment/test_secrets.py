"""No password or token ever appears in a log, a status document, a metric, an event or an error
message: a real stack against a password-protected primary with a token-protected health API,
through a failover, with every output collected and searched."""

import glob
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import redis

from tools.redis_process import RedisProcess, free_port
from harness import Simulator, remove_stack, short_tmpdir, start_stack, wait_for

pytestmark = pytest.mark.integration
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSWORD = "pw-Zq81xSecretValue"
WRONG_PASSWORD = "pw-WrongSecretValue77"
TOKEN = "tok-5fJ2kSecretBearerToken"


def get(url: str, token: str = None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:
        return None, str(exc.reason)


def test_no_secret_in_any_output(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    primary = RedisProcess(short_tmpdir("bf-primary-"), password=PASSWORD).start()
    sim = Simulator(rate=500)
    url = f"redis://:{PASSWORD}@127.0.0.1:{primary.port}/0"
    stack = start_stack(primary, sim, BTCFEED_PRIMARY_URL=url, BTCFEED_HEALTH_TOKEN_FILE=str(token_file))
    outputs = []
    try:
        base = f"http://{stack.env['BTCFEED_HEALTH_ADDR']}"
        wait_for(lambda: get(base + "/health", TOKEN)[0] == 200, 30, "the health API")
        # The token is required on every path, and a wrong one is refused.
        for path in ("/health", "/status", "/metrics"):
            assert get(base + path)[0] == 401
            assert get(base + path, "x" * 30)[0] == 401
        # A failover and a hand-back put the primary's URL and errors into logs and events.
        primary.kill()
        wait_for(lambda: json.loads(get(base + "/health", TOKEN)[1])["status"] == "degraded", 10, "failover")
        outputs += [get(base + p, TOKEN)[1] for p in ("/health", "/status", "/metrics")]
        primary.start()
        wait_for(lambda: json.loads(get(base + "/health", TOKEN)[1])["status"] == "ok", 60, "hand-back")
        outputs += [get(base + p, TOKEN)[1] for p in ("/health", "/status", "/metrics")]
        outputs += [run(["bin/health"], stack.env), run(["bin/health", "--json"], stack.env),
                    run(["bin/btcfeed", "status"], stack.env)]
        # bin/health reading directly (API down) with a wrong password: an error, but not the password.
        direct = {**stack.env, "BTCFEED_HEALTH_ADDR": f"127.0.0.1:{free_port()}",
                  "BTCFEED_PRIMARY_URL": f"redis://:{WRONG_PASSWORD}@127.0.0.1:{primary.port}/0"}
        wrong = run(["bin/health", "--json"], direct)
        assert "AuthenticationError" in wrong or "invalid" in wrong.lower(), wrong
        outputs.append(wrong)
        local = redis.Redis(unix_socket_path=f"{stack.state_dir}/redis.sock")
        outputs.append(repr(local.xrange("btcfeed:events")))
        assert "failover" in outputs[-1] and "hand_back" in outputs[-1]     # the events exist
    finally:
        stack.down()          # first, so that the logs are complete
        logs = {path: open(path, errors="replace").read()
                for path in glob.glob(os.path.join(stack.state_dir, "logs", "*.log"))}
        remove_stack(stack)
        sim.stop()
        primary.stop()
    assert any("failover" in text for text in logs.values())
    assert {"writer.log", "sync.log", "health.log", "listener.log"} <= {os.path.basename(p) for p in logs}
    for name, text in [*logs.items(), *[(f"output {i}", o) for i, o in enumerate(outputs)]]:
        for secret in (PASSWORD, WRONG_PASSWORD, TOKEN):
            assert secret not in text, f"{secret!r} appears in {name}"


def run(argv, env) -> str:
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def test_health_beyond_loopback_needs_a_token(tmp_path):
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_HEALTH_ADDR": f"0.0.0.0:{free_port()}",
           "BTCFEED_HEALTH_TOKEN": "", "BTCFEED_HEALTH_TOKEN_FILE": "",
           "BTCFEED_LOCAL_URL": f"unix://{tmp_path}/none.sock"}
    result = subprocess.run([sys.executable, "-m", "btcfeed.processes.health"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    text = result.stdout + result.stderr
    assert "BTCFEED_HEALTH_TOKEN" in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if line.strip()]) == 1


def test_short_token_is_refused(tmp_path):
    env = {**os.environ, "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_HEALTH_TOKEN": "short"}
    result = subprocess.run([sys.executable, "-m", "btcfeed.processes.health"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "too short" in result.stderr and "short" not in result.stdout
