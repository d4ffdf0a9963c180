"""The container image of deployment/Dockerfile, built and run through the Docker engine's API (the
Docker SDK): every program RUNNING under a non-root user, /health answering, trades from an exchange
reaching a primary, the program logs in `docker logs`, Docker's own HEALTHCHECK healthy, and a clean
stop. Without a reachable engine the tests that need one skip, saying so; the build context is checked
either way.

The container shares the host's network (a Linux engine), so that it reaches the primary and the
exchange simulator this test starts on the host's loopback, and the test reaches its health API."""

import io
import os
import re
import shutil
import tarfile
import time
import urllib.request
import uuid

import docker
import pytest
import requests

from harness import Simulator, primary_last_id, short_tmpdir, wait_for, wait_source_trades
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands.stack import PROGRAMS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = "deployment/Dockerfile"
INSTALL_DIR = "/opt/btcfeed"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def build_context() -> io.BytesIO:
    """The build context as `docker build -f deployment/Dockerfile .` sends it with BuildKit: the
    checkout minus deployment/Dockerfile.dockerignore. (The SDK itself reads only a .dockerignore at the
    root of the context, which this checkout does not have.)"""
    with open(os.path.join(ROOT, DOCKERFILE + ".dockerignore")) as handle:
        patterns = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    context = io.BytesIO()
    docker.utils.tar(ROOT, exclude=patterns, dockerfile=(DOCKERFILE, None), fileobj=context, gzip=True)
    context.seek(0)
    return context


def test_build_context_holds_what_the_image_copies_and_nothing_private():
    with tarfile.open(fileobj=build_context(), mode="r:gz") as archive:
        names = set(archive.getnames())
    for needed in (DOCKERFILE, "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE",
                   "supervisord.conf", "deployment/redis-local.conf", "deployment/container-start",
                   "requirements/runtime.txt", "common/commands/stack.py", "processes/writer.py",
                   "bin/health"):
        assert needed in names, needed
    for private in (".venv", ".git", "var", "tests", "build"):
        assert not any(n == private or n.startswith(private + "/") for n in names), private
    assert not any("__pycache__" in n or n.endswith((".pem", ".key")) for n in names)


@pytest.fixture(scope="module")
def engine():
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        pytest.skip(f"no Docker engine reachable (docker.from_env().ping() failed: {one_line(exc)}): "
                    "the image is not built here")
    yield client
    client.close()


@pytest.fixture(scope="module")
def image(engine):
    tag = f"btcfeed-test:{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        built, _ = engine.images.build(fileobj=build_context(), custom_context=True, encoding="gzip",
                                       dockerfile=DOCKERFILE, tag=tag, rm=True, forcerm=True, timeout=1800)
    except docker.errors.BuildError as exc:
        log = "".join(chunk.get("stream", "") or chunk.get("error", "") for chunk in exc.build_log
                      if isinstance(chunk, dict))
        pytest.fail(f"the image did not build: {one_line(exc)}\n{log[-3000:]}")
    yield built
    try:
        engine.images.remove(built.id, force=True)
    except docker.errors.APIError:
        pass


def run(container, *argv) -> tuple:
    """A command in the running container (its environment, its user): (exit code, output)."""
    result = container.exec_run(list(argv), demux=False)
    return result.exit_code, (result.output or b"").decode(errors="replace")


def program_states(container) -> dict:
    """Each program's supervisord state, as `bin/btcfeed status` in the container shows it."""
    try:
        code, output = run(container, f"{INSTALL_DIR}/bin/btcfeed", "status")
    except docker.errors.APIError:          # not running (yet, or any more)
        return {}
    return dict(re.findall(r"(?m)^([\w-]+) +([A-Z]+)\b", output))


def logs(container, tail="all") -> str:
    return container.logs(tail=tail).decode(errors="replace")


@pytest.mark.integration
@pytest.mark.slow
def test_image_runs_the_stack_and_trades_reach_the_primary(engine, image):
    primary = RedisProcess(short_tmpdir("bf-imgprimary-")).start()
    sim = Simulator(rate=50)
    health_addr = f"127.0.0.1:{free_port()}"
    env = {**sim.env, "BTCFEED_PRIMARY_URL": primary.url, "BTCFEED_SOURCES": sim.source,
           "BTCFEED_HEALTH_ADDR": health_addr, "BTCFEED_API_ADDR": f"127.0.0.1:{free_port()}",
           "BTCFEED_LOG_TO_STDOUT": "1"}
    container = None
    try:
        container = engine.containers.run(image.id, detach=True, name=f"btcfeed-test-{uuid.uuid4().hex[:12]}",
                                          environment=env, network_mode="host")

        def all_running() -> bool:
            container.reload()
            assert container.status != "exited", f"the container exited:\n{logs(container, 60)}"
            return program_states(container) == {name: "RUNNING" for name in PROGRAMS}

        try:
            wait_for(all_running, 90, "every program RUNNING in the container", 1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; programs: {program_states(container)}; logs:\n"
                                 f"{logs(container, 60)}") from None
        code, user = run(container, "id", "-u")
        assert code == 0 and user.strip() not in ("", "0"), user
        # Trades from the exchange reach the primary, and keep coming.
        client = primary.client()
        wait_for(lambda: primary_last_id(client, sim.source) >= 0, 60, "a trade in the primary")
        wait_source_trades(client, sim, 50, timeout_s=30)
        client.close()
        # The health API, from the host and as Docker's HEALTHCHECK runs it.
        with urllib.request.urlopen(f"http://{health_addr}/health", timeout=5) as answer:
            assert answer.status == 200
        code, output = run(container, f"{INSTALL_DIR}/bin/health")
        assert code in (0, 1) and output.startswith("btcfeed"), output
        # BTCFEED_LOG_TO_STDOUT=1: every program's lines are in `docker logs`.
        output = logs(container)
        for name in ("ingest", "writer", "sync", "health", "api", "listener"):
            assert f"proc={name}" in output, name

        def docker_health() -> str:
            container.reload()
            return container.attrs["State"].get("Health", {}).get("Status", "")

        # The first check runs one interval (30 s) after the start.
        wait_for(lambda: docker_health() == "healthy", 120, "Docker's HEALTHCHECK to say healthy", 2)
        # docker stop: SIGTERM to supervisord (PID 1), which stops every program in order and exits 0.
        started = time.monotonic()
        container.stop(timeout=60)
        assert container.wait(timeout=90)["StatusCode"] == 0, logs(container, 40)
        assert time.monotonic() - started < 60
        assert "SIGKILL" not in logs(container, 200), \
            "a program had to be killed: it overran its stopwaitsecs"
    finally:
        if container is not None:
            try:
                container.remove(v=True, force=True)         # with its anonymous state volume
            except docker.errors.APIError:
                pass
        sim.stop()
        primary.stop()
        shutil.rmtree(primary.directory, ignore_errors=True)
