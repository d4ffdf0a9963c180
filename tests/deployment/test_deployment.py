"""The files under deployment/ are what a stranger installs: check that each one parses, names only
files and settings that exist, and that the local Redis configuration really starts."""

import configparser
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest
import redis
import yaml
from packaging.requirements import Requirement

from btcfeed import config
from tools.redis_process import RedisProcess, free_port
from btcfeed.commands.stack import PROGRAMS, Stack
from harness import running

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deployment")
INSTALL_DIR = "/opt/btcfeed"          # where the unit, crontab and cloud-init expect the checkout
STATE_DIR = "/var/lib/btcfeed"


def read(name: str) -> str:
    with open(os.path.join(DEPLOY, name)) as handle:
        return handle.read()


def repo_path(installed: str) -> str:
    """The file in this checkout that an /opt/btcfeed/... path names."""
    assert installed.startswith(INSTALL_DIR + "/"), installed
    return os.path.join(ROOT, installed[len(INSTALL_DIR) + 1:])


def env_lines(text: str) -> dict:
    """KEY=value lines of an environment file (comments and blank lines skipped)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z][A-Z0-9_]*", name), f"not a KEY=value line: {line!r}"
        values[name] = value
    return values


def setting_names() -> set:
    return {"BTCFEED_" + name.upper() for name in config.SETTINGS}


# --- systemd unit --------------------------------------------------------------------------------
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str          # systemd keys are case-sensitive
    parser.read_string(read("btcfeed.service"))
    return parser


def supervisord_stop_budget_s() -> int:
    """What supervisord may take to stop everything: the sum of every program's stopwaitsecs."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read(os.path.join(ROOT, "supervisord.conf"))
    return sum(int(parser[s].get("stopwaitsecs", "10")) for s in parser.sections()
               if s.startswith(("program:", "eventlistener:")))


def test_systemd_unit_has_what_it_needs():
    u = unit()
    service = u["Service"]
    assert service["ExecStart"] == f"{INSTALL_DIR}/.venv/bin/supervisord -n -c {INSTALL_DIR}/supervisord.conf"
    assert service["Environment"] == f"BTCFEED_STATE_DIR={STATE_DIR}"
    assert service["EnvironmentFile"] == "-/etc/btcfeed/env"
    assert service["User"] not in ("", "root") and service["Group"] == service["User"]
    assert service["Restart"] == "always"
    assert service["StateDirectory"] == os.path.basename(STATE_DIR)
    assert service["StateDirectoryMode"] == "0700"
    # Hardening that must not be lost, and the one writable path is the state dir.
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "UMask": "0077"}.items():
        assert service[key] == value, key
    assert service["ReadWritePaths"] == STATE_DIR
    # supervisord gets SIGTERM alone and time to stop every program in order.
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= supervisord_stop_budget_s() + 10
    assert f"{STATE_DIR}/logs" in service["ExecStartPre"] and f"{STATE_DIR}/redis" in service["ExecStartPre"]
    assert u["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in u["Unit"]["After"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    # The unit names /opt/btcfeed; verify a copy that names this checkout, so the executables exist.
    copy = tmp_path / "btcfeed.service"
    copy.write_text(read("btcfeed.service").replace(INSTALL_DIR, ROOT))
    assert os.access(os.path.join(ROOT, ".venv", "bin", "supervisord"), os.X_OK)
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                          timeout=60)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    problems = [line for line in output.splitlines()
                if re.search(r"unknown|invalid|failed|not executable|ignoring|error", line, re.I)]
    assert problems == [], output


@pytest.mark.integration
def test_systemd_commands_run_and_stop_in_time():
    """The unit's ExecStartPre and ExecStart, as systemd runs them (minus the sandbox, which needs
    systemd): the whole stack comes up in the foreground, writes trades, and on SIGTERM to supervisord
    alone (KillMode=mixed) stops every process well within TimeoutStopSec."""
    from harness import Simulator, primary_last_id, run_until, short_tmpdir, wait_for

    service = unit()["Service"]
    state_dir = short_tmpdir("bf-unit-")

    def as_here(command: str) -> list:
        return shlex.split(command.replace(INSTALL_DIR, ROOT).replace(STATE_DIR, state_dir))

    primary = RedisProcess(short_tmpdir("bf-unitprimary-")).start()
    sim = Simulator(rate=200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTCFEED_")}
    env.update(sim.env, BTCFEED_PRIMARY_URL=primary.url, BTCFEED_SOURCES=sim.source,
               BTCFEED_HEALTH_ADDR=f"127.0.0.1:{free_port()}", BTCFEED_API_ADDR=f"127.0.0.1:{free_port()}",
               BTCFEED_STATE_DIR=state_dir)
    supervisord, children = None, []
    try:
        subprocess.run(as_here(service["ExecStartPre"]), env=env, check=True, timeout=30)
        supervisord = subprocess.Popen(as_here(service["ExecStart"]), env=env, cwd=ROOT,
                                       start_new_session=True, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        stack = Stack(state_dir)
        stack.wait_running(PROGRAMS, 30)
        client = primary.client()
        wait_for(lambda: primary_last_id(client, sim.source) >= 0, 30, "a trade in the primary")
        client.close()
        # The operator's commands of the guide, through with-env with an env file and an otherwise
        # bare environment (as sudo leaves it).
        env_file = os.path.join(state_dir, "env")
        with open(env_file, "w") as handle:
            handle.writelines(f"{k}={v}\n" for k, v in env.items()
                              if k.startswith("BTCFEED_") and k != "BTCFEED_STATE_DIR")
        bare = {"PATH": os.environ["PATH"], "BTCFEED_ENV_FILE": env_file,
                "BTCFEED_SERVICE_STATE_DIR": state_dir}
        for command, expected in (("bin/health", r"^btcfeed (OK|WARNING)"),
                                  ("bin/btcfeed status", r"(?m)^writer +RUNNING"),
                                  ("bin/sync-check", r"^SYNC-CHECK (OK|WARNING)")):
            run_until([os.path.join(DEPLOY, "with-env"), *as_here(f"{INSTALL_DIR}/{command}")],
                      lambda done: done.returncode in (0, 1) and re.search(expected, done.stdout), 30,
                      f"{command} to answer as expected", env=bare, cwd="/")
        children[:] = [p["pid"] for p in stack.processes()]
        assert all(children)
        started = time.monotonic()
        supervisord.send_signal(signal.SIGTERM)
        supervisord.wait(int(service["TimeoutStopSec"]))
        took = time.monotonic() - started
        assert took < int(service["TimeoutStopSec"]) / 2, f"stopping took {took:.1f}s"
        for pid in children:
            assert not running(pid), f"process {pid} outlived supervisord"
        with open(os.path.join(state_dir, "logs", "supervisord.log")) as handle:
            log = handle.read()
        assert "SIGKILL" not in log, "a process had to be killed: it did not stop within its stopwaitsecs"
        assert "stopped: redis-local" in log
        assert os.listdir(os.path.join(state_dir, "redis")), "the local Redis wrote no AOF"
    finally:
        _stop_supervisord(supervisord)
        for pid in children:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        sim.stop()
        primary.stop()
        shutil.rmtree(primary.directory, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)


def _stop_supervisord(supervisord) -> None:
    """What a test started under supervisord stops with it (or by force), whatever the test left."""
    if supervisord is None or supervisord.poll() is not None:
        return
    # supervisord stops its children (each in a process group of its own) only on SIGTERM.
    supervisord.send_signal(signal.SIGTERM)
    try:
        supervisord.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(supervisord.pid, signal.SIGKILL)
        supervisord.wait(10)


# --- Docker --------------------------------------------------------------------------------------
def dockerignore_patterns() -> list:
    return [line.strip() for line in read("Dockerfile.dockerignore").splitlines()
            if line.strip() and not line.startswith("#")]


def test_dockerfile_is_consistent_with_the_checkout():
    text = read("Dockerfile")
    instructions = [line for line in re.sub(r"\\\n", " ", text).splitlines()
                    if line and not line.startswith("#")]
    # A fixed Python release, not a moving tag: a rebuild gets the interpreter the lock was made for.
    assert re.fullmatch(r"FROM python:3\.11\.\d+-slim-bookworm", instructions[0]), instructions[0]
    assert re.search(r"apt-get install [^\n]*redis-server", text)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("VOLUME") and STATE_DIR in line for line in instructions)
    assert any(line.startswith("HEALTHCHECK") and f"{INSTALL_DIR}/bin/health" in line
               for line in instructions)
    cmd = [line for line in instructions if line.startswith("CMD ")][-1]
    assert cmd == f'CMD ["{INSTALL_DIR}/deployment/container-start"]'
    start = read("container-start")
    assert 'exec "$root/.venv/bin/supervisord" -n -c "$conf"' in start
    assert 'conf="$root/supervisord.conf"' in start
    assert 'conf="$root/deployment/supervisord-docker.conf"' in start
    assert os.access(os.path.join(DEPLOY, "container-start"), os.X_OK)
    # The packages come from the runtime lock, hashes checked, before btcfeed itself, which is built
    # with the lock's setuptools and installed as a regular (not editable) package.
    runs = [line for line in instructions if line.startswith("RUN ")]
    lock_run = next(i for i, line in enumerate(runs) if "-r requirements/runtime.txt" in line)
    assert "--require-hashes" in runs[lock_run]
    own = [line for line in runs if re.search(r"pip install .*--no-deps", line)]
    assert len(own) == 1 and runs.index(own[0]) > lock_run
    assert "--no-build-isolation ." in own[0] and " -e " not in own[0] and "pip check" in own[0]
    assert not any("--upgrade" in line for line in runs), "an unpinned upgrade undoes the lock"
    copy_lock = instructions.index("COPY requirements/runtime.txt requirements/")
    assert copy_lock < instructions.index(runs[lock_run])
    assert "BTCFEED_LOG_TO_STDOUT" in text
    assert f"WORKDIR {INSTALL_DIR}" in instructions
    # Everything copied exists here and is not excluded from the build context.
    ignored = dockerignore_patterns()
    copied = []
    for line in instructions:
        if line.startswith("COPY "):
            copied += line.split()[1:-1]
    assert copied
    for source in copied:
        assert os.path.exists(os.path.join(ROOT, source)), source
        assert source.rstrip("/") not in ignored, \
            f"{source} is copied but excluded by Dockerfile.dockerignore"
    # What supervisord.conf and bin/ need at run time is in the image.
    for needed in ("supervisord.conf", "bin/", "common/", "processes/", "deployment/", "setup.cfg",
                   "requirements/runtime.txt"):
        assert needed in copied, needed
    for excluded in (".venv", "var", ".git"):
        assert excluded in ignored


def test_compose_file():
    text = read("docker-compose.yml")
    # Text-level checks that do not need a YAML parser.
    assert "bin/health" in text and "profiles: [sentinel]" in text
    doc = yaml.safe_load(text)
    services = doc["services"]
    assert {"btcfeed", "primary", "primary-replica", "sentinel-1", "sentinel-2",
            "sentinel-3"} <= set(services)
    app = services["btcfeed"]
    assert app["build"]["dockerfile"] == "deployment/Dockerfile" and app["build"]["context"] == ".."
    assert any("bin/health" in part for part in app["healthcheck"]["test"])
    assert any(volume.endswith(":" + STATE_DIR) for volume in app["volumes"])
    assert set(app["environment"]) <= setting_names() | {"BTCFEED_LOG_TO_STDOUT"}
    # The processes' logs reach `docker compose logs`, and the engine bounds what it keeps of them.
    assert app["environment"]["BTCFEED_LOG_TO_STDOUT"] == "1"
    assert app["logging"]["driver"] == "json-file" and app["logging"]["options"]["max-size"]
    primary = " ".join(services["primary"]["command"])
    assert "--appendonly yes" in primary and "--maxmemory-policy noeviction" in primary
    assert "profiles" not in services["primary"] and "profiles" not in app
    for name in ("primary-replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        assert services[name]["profiles"] == ["sentinel"], name
    assert "ports" not in services["primary"]       # the stand-in primary is not published


def supervisor_sections(path: str) -> dict:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",), strict=True)
    parser.read(path)
    return {name: dict(parser[name]) for name in parser.sections()}


def test_container_log_switch_covers_every_program():
    """deployment/supervisord-docker.conf is supervisord.conf with the output of every program moved to
    supervisord's stdout/stderr: nothing else changes, and no program is left writing to a file."""
    entry = supervisor_sections(os.path.join(DEPLOY, "supervisord-docker.conf"))
    assert entry == {"include": {"files": "../supervisord.conf supervisord-stdout-logs.conf"}}
    programs = {name for name in supervisor_sections(os.path.join(ROOT, "supervisord.conf"))
                if name.startswith(("program:", "eventlistener:"))}
    overrides = supervisor_sections(os.path.join(DEPLOY, "supervisord-stdout-logs.conf"))
    assert set(overrides) == programs
    for name, values in overrides.items():
        # an event listener's stdout is its protocol with supervisord
        stream = "stderr" if name.startswith("eventlistener:") else "stdout"
        assert values == {f"{stream}_logfile": f"/dev/{stream}", f"{stream}_logfile_maxbytes": "0",
                          f"{stream}_logfile_backups": "0"}, name


def test_container_start_refuses_an_unknown_log_switch(tmp_path):
    env = {"PATH": os.environ["PATH"], "BTCFEED_STATE_DIR": str(tmp_path), "BTCFEED_LOG_TO_STDOUT": "yes"}
    done = subprocess.run([os.path.join(DEPLOY, "container-start")], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "BTCFEED_LOG_TO_STDOUT must be 0 or 1" in done.stderr


@pytest.mark.integration
def test_container_start_sends_program_logs_to_stdout():
    """The container's command with BTCFEED_LOG_TO_STDOUT=1, run from this checkout: every program's
    lines come out of supervisord's stdout/stderr (what `docker logs` shows), no program log file is
    written, bin/btcfeed status still reaches supervisord, and SIGTERM stops everything."""
    from harness import Simulator, short_tmpdir

    state_dir = short_tmpdir("bf-cstart-")
    primary = RedisProcess(short_tmpdir("bf-cstartprimary-")).start()
    sim = Simulator(rate=50)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BTCFEED_")}
    env.update(sim.env, BTCFEED_PRIMARY_URL=primary.url, BTCFEED_SOURCES=sim.source,
               BTCFEED_HEALTH_ADDR=f"127.0.0.1:{free_port()}", BTCFEED_API_ADDR=f"127.0.0.1:{free_port()}",
               BTCFEED_STATE_DIR=state_dir,
               BTCFEED_LOG_TO_STDOUT="1")
    out_path = os.path.join(state_dir + "-out")
    supervisord = None
    try:
        with open(out_path, "wb") as out:
            supervisord = subprocess.Popen([os.path.join(DEPLOY, "container-start")], env=env, cwd="/",
                                           start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        Stack(state_dir).wait_running(PROGRAMS, 30)
        deadline = time.monotonic() + 30
        wanted = {f"proc={name}" for name in ("ingest", "writer", "sync", "health", "api", "listener")}
        while True:
            with open(out_path, errors="replace") as handle:
                output = handle.read()
            missing = {w for w in wanted if w not in output}
            if not missing and re.search(r"(?i)ready to accept connections", output):     # redis-local
                break
            assert time.monotonic() < deadline, f"no lines from {sorted(missing)} in:\n{output[-3000:]}"
            time.sleep(0.2)
        status = subprocess.run([os.path.join(ROOT, "bin", "btcfeed"), "status"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert re.search(r"(?m)^writer +RUNNING", status.stdout), status.stdout + status.stderr
        # supervisord's own log stays (it also goes to stdout); so does the AUTO file that supervisord.conf
        # gives the listener's stdout (the event protocol, no log lines), named NAME-stdout---*.log.
        program_logs = [name for name in os.listdir(os.path.join(state_dir, "logs"))
                        if name != "supervisord.log" and "---" not in name]
        assert program_logs == [], program_logs
        children = [p["pid"] for p in Stack(state_dir).processes()]
        assert all(children)
        supervisord.send_signal(signal.SIGTERM)
        assert supervisord.wait(60) == 0
        for pid in children:
            assert not running(pid), f"process {pid} outlived supervisord"
    finally:
        _stop_supervisord(supervisord)
        sim.stop()
        primary.stop()
        shutil.rmtree(primary.directory, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        if os.path.exists(out_path):
            os.unlink(out_path)


# --- the Python packages: locked with hashes ----------------------------------------------------------
def locked(name: str) -> dict:
    """package name (normalized) -> (version, hash count) of a lock file in requirements/."""
    pins = {}
    with open(os.path.join(ROOT, "requirements", name)) as handle:
        text = handle.read()
    for entry in re.split(r"\n(?=[A-Za-z0-9])", text):      # one entry: a pin, its hashes, its "via" lines
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", entry)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = (match.group(2),
                                                                    entry.count("--hash=sha256:"))
    return pins


def declared(*extras: str) -> list:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"))
    lines = parser["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += parser["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


@pytest.mark.parametrize("lock, extras", [("lock.txt", ("test", "bench")), ("runtime.txt", ())])
def test_locks_pin_what_setup_cfg_declares_with_hashes(lock, extras):
    pins = locked(lock)
    assert pins, lock
    for name, (version, hashes) in pins.items():
        assert hashes >= 1, f"{lock}: {name} has no hash (pip --require-hashes would refuse it)"
    for requirement in declared(*extras):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{lock} lacks {requirement}: run requirements/compile"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), \
            f"{lock} pins {name}=={pins[name][0]}, setup.cfg wants {requirement}: run requirements/compile"
    # What installs and builds btcfeed is locked too.
    assert {"pip", "setuptools"} <= set(pins)


def test_runtime_lock_is_the_test_lock_minus_test_packages():
    runtime, full = locked("runtime.txt"), locked("lock.txt")
    assert {name: pin[0] for name, pin in runtime.items()} == {name: full[name][0] for name in runtime}
    assert "pytest" not in runtime and "hypothesis" not in runtime


def test_fakeredis_is_not_declared():
    names = {re.sub(r"[-_.]+", "-", r.name).lower() for r in declared("test", "bench")}
    assert "fakeredis" not in names and {"pyyaml", "pybreaker"} <= names


def test_setup_installs_from_the_lock():
    text = open(os.path.join(ROOT, "bin", "setup")).read()
    assert "lock=requirements/lock.txt" in text and "--runtime) lock=requirements/runtime.txt" in text
    assert 'pip install -q --require-hashes -r "$lock"' in text
    assert re.search(r"pip install -q --no-deps --no-build-isolation --use-pep517 -e \.$", text, re.M)
    # Idempotent, and installs again when the lock or setup.cfg changes.
    assert re.search(r'stamp=.*\$lock.*cat "\$lock" setup\.cfg setup\.py', text)
    assert not re.search(r"pip install [^\n]*(--upgrade|\.\[test\])", text), "an unlocked install"


# --- configuration examples -------------------------------------------------------------------------
def test_toml_example_lists_every_setting_with_its_default(monkeypatch):
    path = os.path.join(DEPLOY, "btcfeed.toml.example")
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    assert set(data) - set(config.SETTINGS) == set(), "unknown keys in btcfeed.toml.example"
    assert set(config.SETTINGS) - set(data) == set(), \
        "settings missing from deployment/btcfeed.toml.example: add them with their default and a comment"
    # Through BTCFEED_CONFIG, as the processes read it: the example changes nothing.
    for name in list(os.environ):
        if name.startswith("BTCFEED_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BTCFEED_CONFIG", path)
    from_file = config.load()
    monkeypatch.delenv("BTCFEED_CONFIG")
    assert from_file == config.load()


def test_env_example_names_known_settings_and_loads(tmp_path):
    text = read("env.example")
    active = env_lines(text)
    mentioned = set(re.findall(r"^#?(BTCFEED_[A-Z0-9_]+)=", text, re.M))
    assert mentioned <= setting_names() | {"BTCFEED_CONFIG"}, mentioned - setting_names()
    assert "BTCFEED_STATE_DIR" not in mentioned        # the unit sets it (ReadWritePaths= must match)
    for name, value in active.items():
        assert not re.search(r"[\s'\"$&;<>`\\|]", value), f"{name}: value not plain for systemd and sh"
    assert active["BTCFEED_PRIMARY_URL"].startswith("rediss://")
    # Valid configuration once the secret file exists.
    password = tmp_path / "primary-password"
    password.write_text("example-password\n")
    cfg = config.load({**active, "BTCFEED_PRIMARY_PASSWORD_FILE": str(password)})
    assert cfg.primary_password == "example-password" and cfg.health_host == "127.0.0.1"


def test_with_env_reads_the_env_file_like_systemd(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text(read("env.example"))
    env = {"PATH": os.environ["PATH"], "BTCFEED_ENV_FILE": str(env_file),
           "BTCFEED_SERVICE_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([os.path.join(DEPLOY, "with-env"), "env"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    for name, value in env_lines(read("env.example")).items():
        assert seen.get(name) == value, name
    assert seen["BTCFEED_STATE_DIR"] == str(tmp_path / "state")
    # No env file: still runs, with the state dir set.
    env["BTCFEED_ENV_FILE"] = str(tmp_path / "missing")
    done = subprocess.run([os.path.join(DEPLOY, "with-env"), "sh", "-c", 'echo "$BTCFEED_STATE_DIR"'],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "state")


def cloud_init_env_block(text: str) -> str:
    match = re.search(r"- path: /etc/btcfeed/env\n(?:\s+\w+: .*\n)*?\s+content: \|\n((?:\s{6}.*\n)+)", text)
    assert match, "no /etc/btcfeed/env in cloud-init.yaml"
    return "\n".join(line.strip() for line in match.group(1).splitlines())


def test_cloud_init_matches_the_other_files():
    text = read("cloud-init.yaml")
    assert text.startswith("#cloud-config\n")
    assert "REPLACE-WITH-YOUR-REPOSITORY" in text       # the placeholder is there and clearly marked
    assert env_lines(cloud_init_env_block(text)) == env_lines(read("env.example"))
    for path in sorted(set(re.findall(INSTALL_DIR + r"/[\w./-]+", text))):
        assert os.path.exists(repo_path(path)), path
    for package in ("git", "python3-venv", "redis-server"):
        assert re.search(rf"^  - {package}$", text, re.M), package
    assert "crontab -u btcfeed /opt/btcfeed/deployment/crontab" in text
    assert "/etc/systemd/system/btcfeed.service" in text and "systemctl enable btcfeed" in text
    assert "primary-password" in text and "PASSWORD=" not in text.upper().replace("_FILE=", "")
    doc = yaml.safe_load(text)
    assert {"packages", "users", "write_files", "runcmd"} <= set(doc)
    # A server gets only what the service runs, from the runtime lock (bin/setup --runtime).
    commands = [" ".join(c) if isinstance(c, list) else c for c in doc["runcmd"]]
    assert [c for c in commands if "bin/setup" in c] == ["sh -c cd /opt/btcfeed && bin/setup --runtime"]


def test_crontab_lines_name_existing_files():
    jobs = []
    for line in read("crontab").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if re.fullmatch(r"[A-Z_]+=\S+", line):
            continue
        fields = line.split(None, 5)
        assert len(fields) == 6 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), line
        jobs.append(fields[5])
    assert len(jobs) == 1
    for path in re.findall(INSTALL_DIR + r"/[\w./-]+", jobs[0]):
        assert os.access(repo_path(path), os.X_OK), path
    assert "sync-check --repair" in jobs[0] and "flock -n" in jobs[0] and "%" not in jobs[0]


# --- the local Redis ---------------------------------------------------------------------------------
def redis_directives() -> dict:
    out = {}
    for line in read("redis-local.conf").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            out[name.lower()] = value.strip()
    return out


def test_redis_local_conf_settings():
    d = redis_directives()
    assert d["appendonly"] == "yes" and d["appendfsync"] in ("everysec", "always")
    assert d["maxmemory-policy"] == "noeviction" and d["maxmemory"]
    assert d["port"] == "0" and d["unixsocketperm"] in ("700", "770")
    assert d["save"] == '""'
    assert "bind" not in d and "requirepass" not in d


@pytest.mark.integration
def test_redis_local_conf_starts_a_server(tmp_path):
    directory = tmp_path / "r"
    directory.mkdir()
    sock = os.path.join("/tmp", f"bf-conf-{os.getpid()}.sock")      # short: unix socket paths are limited
    process = subprocess.Popen(["redis-server", os.path.join(DEPLOY, "redis-local.conf"),
                                "--dir", str(directory), "--unixsocket", sock],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(unix_socket_path=sock, socket_timeout=5, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, process.stdout.read().decode(errors="replace")
                assert time.monotonic() < deadline, "redis-server did not answer on its socket"
                time.sleep(0.05)
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        assert os.stat(sock).st_mode & 0o777 == 0o700
        client.set("k", "v")
        assert os.listdir(directory), "no AOF written"
    finally:
        client.close()
        process.terminate()
        process.wait(10)


# --- the ACL recipe (its behaviour is tested in tests/test_acl.py) -----------------------------------
def test_acl_recipe_ships_no_password():
    users = [line for line in read("primary-acl.conf").splitlines() if line.startswith("user ")]
    assert [line.split()[1] for line in users] == ["btcfeed", "reader"]
    for line in users:
        rules = line.split()[2:]
        assert rules[:2] == ["reset", "on"], line            # re-applying replaces, never adds
        assert [r for r in rules if r.startswith(("#", ">"))] in (["#BTCFEED_PASSWORD_SHA256"],
                                                                 ["#READER_PASSWORD_SHA256"]), line
        assert "nopass" not in rules and "allkeys" not in rules and "+@all" not in rules and "~*" not in rules
