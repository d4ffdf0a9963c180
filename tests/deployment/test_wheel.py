"""btcfeed installed from its wheel, away from the checkout: the package carries the stack's supervisord
configuration and local Redis configuration, and `btcfeed up`, `status`, `down` run from any directory.
The checkout itself keeps running its own supervisord.conf."""

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import urllib.request

import pytest

from btcfeed.commands import stack
from tools.redis_process import RedisProcess, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What building the wheel reads (the Dockerfile copies the same before its `pip install .`).
BUILD_INPUTS = ("setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "supervisord.conf",
                "deployment/redis-local.conf", "common", "processes")


def supervisor_programs(path: str) -> dict:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",), strict=True)
    parser.read(path)
    return {name.split(":", 1)[1]: parser[name] for name in parser.sections()
            if name.startswith(("program:", "eventlistener:"))}


# --- which configuration a stack runs with ---------------------------------------------------------
def test_the_checkout_runs_its_own_supervisord_conf(tmp_path):
    assert stack.from_checkout()
    assert stack.config_path(str(tmp_path)) == os.path.join(ROOT, "supervisord.conf")
    assert os.listdir(tmp_path) == []          # nothing rendered


def test_rendered_configuration_names_the_installed_files(tmp_path):
    python = str(tmp_path / "my venv" / "bin" / "python%1")          # a space and a % survive
    redis_conf = os.path.join(ROOT, "deployment", "redis-local.conf")
    state_dir = tmp_path / "state"
    path = stack.render_config(os.path.join(ROOT, "supervisord.conf"), redis_conf, str(state_dir), python)
    assert path == str(state_dir / "supervisord.conf")
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = open(path).read()
    programs = supervisor_programs(path)
    assert set(programs) == set(stack.PROGRAMS)
    for name, section in programs.items():
        # supervisord expands %% to % and splits the command as a shell does
        argv = shlex.split(section["command"].replace("%%", "%"))
        if name == "redis-local":
            assert argv[:2] == ["redis-server", redis_conf]
        else:
            assert argv == [python, "-m", f"btcfeed.processes.{name}"]
            assert section["directory"] == "%(here)s"            # the state dir, where the file is
    # Everything else is the checkout's supervisord.conf, line for line.
    checkout = open(os.path.join(ROOT, "supervisord.conf")).read().splitlines()
    rendered = text.splitlines()
    assert rendered[0].startswith("; Written by `btcfeed up`") and python in rendered[0]
    rendered = rendered[3:]                     # the header
    assert len(rendered) == len(checkout)
    assert [a for a, b in zip(rendered, checkout) if a != b and "%(here)s/" not in b] == []


def test_a_template_naming_another_checkout_file_is_refused_in_one_line(tmp_path):
    template = tmp_path / "supervisord.conf"
    template.write_text(open(os.path.join(ROOT, "supervisord.conf")).read()
                        + "\n[program:extra]\ncommand=%(here)s/bin/extra\n")
    with pytest.raises(stack.StackError) as refused:
        stack.render_config(str(template), os.path.join(ROOT, "deployment", "redis-local.conf"),
                            str(tmp_path / "state"))
    assert "\n" not in str(refused.value) and "%(here)s/bin/extra" in str(refused.value)


def test_a_package_without_its_stack_files_says_so_in_one_line(tmp_path):
    with pytest.raises(stack.StackError) as refused:
        stack.render_config(str(tmp_path / "missing.conf"), str(tmp_path / "redis-local.conf"),
                            str(tmp_path / "state"))
    assert "\n" not in str(refused.value) and "supervisord configuration" in str(refused.value)


# --- the wheel, installed into a venv of its own ----------------------------------------------------
def build_wheel(workdir: str) -> str:
    """The wheel, built from a copy of the build inputs (a build in the checkout would leave build/ and
    *.egg-info behind, and two at once would collide); with this venv's locked setuptools, offline."""
    source = os.path.join(workdir, "src")
    for name in BUILD_INPUTS:
        target = os.path.join(source, name)
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), target)
    wheels = os.path.join(workdir, "wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "-w", wheels, source], check=True, capture_output=True, timeout=120)
    (wheel,) = os.listdir(wheels)
    return os.path.join(wheels, wheel)


def install_venv(workdir: str, wheel: str) -> str:
    """A new venv holding the wheel; its dependencies are this venv's (the same locked versions), added
    to its path by a .pth file, which adds the directory only (the checkout's editable install there is
    not run). Returns the venv's bin directory."""
    venv = os.path.join(workdir, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    python = os.path.join(venv, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=30).stdout.strip()
    with open(os.path.join(site, "zz-btcfeed-dependencies.pth"), "w") as handle:
        handle.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-index", wheel], check=True, capture_output=True, timeout=120)
    return os.path.join(venv, "bin")


@pytest.mark.integration
def test_installed_wheel_runs_the_stack_from_any_directory():
    from harness import Simulator, primary_last_id, short_tmpdir, wait_for

    workdir = short_tmpdir("bf-whl-")
    primary = RedisProcess(short_tmpdir("bf-whlprimary-")).start()
    sim = Simulator(rate=50)
    health_addr = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BTCFEED_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(sim.env, BTCFEED_PRIMARY_URL=primary.url, BTCFEED_SOURCES=sim.source,
               BTCFEED_HEALTH_ADDR=health_addr, BTCFEED_API_ADDR=f"127.0.0.1:{free_port()}")
    cwd = os.path.join(workdir, "run")           # the state dir is the default, ./var from here
    os.makedirs(cwd)
    state_dir = os.path.join(cwd, "var")
    bin_dir = None

    def btcfeed(*argv, timeout=90):
        return subprocess.run([os.path.join(bin_dir, "btcfeed"), *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        wheel = build_wheel(workdir)
        bin_dir = install_venv(workdir, wheel)
        python = os.path.join(bin_dir, "python")
        where = subprocess.run([python, "-c", "import btcfeed; print(btcfeed.__file__)"], cwd=cwd, env=env,
                               capture_output=True, text=True, timeout=30)
        assert where.stdout.startswith(workdir + "/venv/"), where.stdout + where.stderr

        up = btcfeed("up")
        assert up.returncode == 0, up.stdout + up.stderr
        conf = os.path.join(state_dir, "supervisord.conf")
        text = open(conf).read()
        assert ROOT + "/" not in text, "the installed stack names a file of the checkout"
        # The operator's supervisorctl, with the rendered configuration: every program RUNNING.
        ctl = subprocess.run([python, "-m", "supervisor.supervisorctl", "-c", conf, "status"],
                             cwd=cwd, env={**env, "BTCFEED_STATE_DIR": state_dir}, capture_output=True,
                             text=True, timeout=30)
        states = dict(line.split()[:2] for line in ctl.stdout.splitlines() if line.strip())
        assert states == {name: "RUNNING" for name in stack.PROGRAMS}, ctl.stdout + ctl.stderr
        # The programs are the wheel's, run by the venv's interpreter.
        for info in stack.Stack(state_dir).processes():
            if info["name"] != "redis-local":
                with open(f"/proc/{info['pid']}/cmdline", "rb") as handle:
                    argv = handle.read().split(b"\0")
                assert os.path.dirname(argv[0].decode()) == bin_dir, (info["name"], argv)
        status = btcfeed("status")
        assert re.search(r"(?m)^writer +RUNNING", status.stdout), status.stdout + status.stderr
        # Trades reach the primary, and the health API answers.
        client = primary.client()
        wait_for(lambda: primary_last_id(client, sim.source) >= 0, 30, "a trade in the primary")
        client.close()
        with urllib.request.urlopen(f"http://{health_addr}/health", timeout=5) as answer:
            assert answer.status == 200
        down = btcfeed("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert stack.Stack(state_dir).supervisord_pid() is None
    finally:
        if bin_dir is not None and stack.Stack(state_dir).supervisord_pid() is not None:
            btcfeed("down")
        sim.stop()
        primary.stop()
        shutil.rmtree(primary.directory, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
