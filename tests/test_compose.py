"""The docker-compose stack, checked without a Docker engine (these machines have none).

Static checks of docker-compose.yml, the runner's Dockerfile, .dockerignore and docker/:
the YAML parses into known compose keys; every ${VAR} has a default; images are pinned;
healthchecks and depends_on conditions; the runner's PREFECT_API_URL / MLFLOW_TRACKING_URI and
the servers' database URLs point at services, ports, databases and credentials that exist;
volumes and ports are consistent; the gpu profile reserves an NVIDIA GPU. Two checks run real
code: the package builds (with its shipped assets and the `atr` entry point) from exactly the
files the Dockerfile copies, and the runner's healthcheck script is run against a real Prefect
server. `docker compose config` runs too where the compose plugin exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
INIT_SQL = REPO / "docker" / "postgres" / "init.sql"
HEALTHCHECK_SCRIPT = REPO / "docker" / "runner-healthcheck.py"

EXPECTED_SERVICES = {"postgres", "prefect-server", "mlflow", "runner", "runner-gpu"}
RUNNERS = ("runner", "runner-gpu")
# The secrets .env must hold (docker/make-env.py writes them): compose has no default for any.
SECRETS_ENV = {"POSTGRES_PASSWORD": "pg-s3cret", "PREFECT_API_AUTH_STRING": "atr:pf-s3cret",
               "MLFLOW_TRACKING_USERNAME": "atr", "MLFLOW_TRACKING_PASSWORD": "ml-s3cret",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-s3cret"}
# Settings a user may also put in .env; the defaults are what `docker compose up` uses without them.
CUSTOM_ENV = {**SECRETS_ENV, "POSTGRES_PASSWORD": "s3cret-pw", "ATR_CRON": "30 1 * * 1",
              "ATR_DEPLOYMENT_NAME": "weekly", "ATR_THREADS": "8", "ATR_BIND_ADDRESS": "0.0.0.0"}
ENVS = pytest.mark.parametrize("env", [SECRETS_ENV, CUSTOM_ENV], ids=["defaults", "custom-env"])

# Compose Specification: top-level and service-level keys (a typo such as `healtcheck` would be
# silently ignored by nothing here, so it is caught here).
TOP_LEVEL_KEYS = {"name", "version", "services", "networks", "volumes", "configs", "secrets", "include", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent", "command",
    "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota", "cpu_rt_period",
    "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on", "deploy", "develop",
    "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck",
    "hostname", "image", "init", "ipc", "isolation", "labels", "links", "logging", "mac_address", "mem_limit",
    "mem_reservation", "mem_swappiness", "memswap_limit", "network_mode", "networks", "oom_kill_disable",
    "oom_score_adj", "pid", "pids_limit", "platform", "ports", "post_start", "pre_stop", "privileged", "profiles",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode",
    "uts", "volumes", "volumes_from", "working_dir",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}


# --- helpers -----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_EXPR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:-|-|:\?|\?)(.*))?", re.DOTALL)


class Required(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty: compose refuses to start."""


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation over a tree: $$, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?message} and ${VAR?message} (the last two raise :class:`Required` as compose does)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        expr = match.group(1) if match.group(1) is not None else match.group(2)
        m = _EXPR.fullmatch(expr)
        assert m, f"${{{expr}}} is not compose syntax"
        name, op, arg = m.groups()
        present = env.get(name)
        if op in (":-", "-"):
            return arg if present is None or (op == ":-" and present == "") else present
        if op in (":?", "?"):
            if present is None or (op == ":?" and present == ""):
                raise Required(f"{name}: {arg}")
            return present
        if name not in env:
            raise KeyError(f"${{{expr}}} has no default and is not set")
        return env[name]

    return _VAR.sub(one, value)


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(raw_compose(), SECRETS_ENV if env is None else env)


def service_command(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def healthcheck_text(service: dict) -> str:
    test = service["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else test


def published_ports(service: dict) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) per `ports` entry (short syntax)."""
    out = []
    for entry in service.get("ports", []):
        assert isinstance(entry, str), f"use the short port syntax: {entry!r}"
        parts = entry.split("/")[0].split(":")
        host_ip, host_port, container_port = (parts if len(parts) == 3 else ["", *parts])
        out.append((host_ip, int(host_port), int(container_port)))
    return out


def mounts(service: dict) -> list[dict]:
    """Volume mounts as dicts with type, source, target, read_only (short or long syntax)."""
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            out.append({"type": entry["type"], "source": entry.get("source"), "target": entry["target"],
                        "read_only": bool(entry.get("read_only", False)), "bind": entry.get("bind", {})})
            continue
        parts = entry.split(":")
        source, target = parts[0], parts[1]
        mode = parts[2] if len(parts) > 2 else ""
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target, "read_only": "ro" in mode.split(","),
                    "bind": {}})
    return out


def on_mount(service: dict, path: str, kind: str | None = None) -> dict | None:
    """The mount whose target holds `path`."""
    for mount in mounts(service):
        target = mount["target"].rstrip("/")
        if (path == target or path.startswith(target + "/")) and (kind is None or mount["type"] == kind):
            return mount
    return None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for instruction, rest in dockerfile_instructions(path):
        if instruction == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            args[name.strip()] = default.strip().strip('"')
    return args


def dockerfile_bases(path: Path) -> list[str]:
    """FROM images with ARG defaults substituted."""
    args = dockerfile_args(path)
    bases = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction == "FROM":
            image = next(w for w in rest.split() if not w.startswith("--"))
            bases.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image))
    return bases


def assert_pinned(image: str) -> None:
    """name:tag with an explicit version tag (digits and a dot), never latest or a bare name."""
    assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"{image}: no tag"
    tag = image.rsplit("/", 1)[-1].split(":", 1)[1].split("@")[0]
    assert "latest" not in tag, f"{image}: floating tag"
    assert re.match(r"v?\d+\.\d+(\.\d+)?([-.].+)?$", tag), f"{image}: tag {tag!r} is not an exact version"
    assert "$" not in image, f"{image}: variable in the image name"


def copy_instructions(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    out = []
    for instruction, rest in dockerfile_instructions(path):
        if instruction in {"COPY", "ADD"}:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            assert not any(w.startswith("--from") for w in shlex.split(rest))
            out.append((words[:-1], words[-1]))
    return out


# .dockerignore, with Docker's rules: the last matching pattern wins, `!` re-includes, and a
# pattern that matches a directory matches everything under it.
def _dockerignore_rules() -> list[tuple[bool, str, re.Pattern]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, pattern, re.compile(regex + "$")))
    return rules


def in_build_context(relpath: str, rules) -> bool:
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, _, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def build_context_files() -> list[str]:
    """Files of the working tree that `docker build .` sends, as paths relative to the repo."""
    rules = _dockerignore_rules()
    # literal beginnings of the `!` patterns: an excluded directory none of them reaches into is skipped
    reach = [re.split(r"[*?\[]", pattern, maxsplit=1)[0] for negate, pattern, _ in rules if negate]
    files = []
    for root, dirs, names in os.walk(REPO):
        rel_root = os.path.relpath(root, REPO).replace(os.sep, "/")
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if in_build_context(rel_root + d, rules)
                   or any((rel_root + d + "/").startswith(r) or r.startswith(rel_root + d + "/") for r in reach)]
        files += [rel_root + n for n in names if in_build_context(rel_root + n, rules)]
    return files


def image_tree(root: Path) -> None:
    """Recreate under `root` what the Dockerfile's COPY instructions put into the image."""
    context = build_context_files()
    for sources, dest in copy_instructions(DOCKERFILE):
        into_dir = dest.endswith("/") or len(sources) > 1
        for source in sources:
            source = source.rstrip("/")
            below = [f for f in context if f.startswith(source + "/")]
            if below:  # a directory: its contents go to dest
                for f in below:
                    target = root / dest.lstrip("/") / f[len(source) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / f, target)
            elif source in context:
                target = root / dest.lstrip("/") / Path(source).name if into_dir else root / dest.lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / source, target)


# --- the compose file ---------------------------------------------------------------------------

def test_yaml_parses_into_known_compose_keys():
    data = raw_compose()
    assert set(data["services"]) == EXPECTED_SERVICES
    assert {k for k in data if not k.startswith("x-")} <= TOP_LEVEL_KEYS
    for name, service in data["services"].items():
        unknown = {k for k in service if not k.startswith("x-")} - SERVICE_KEYS
        assert not unknown, f"{name}: unknown keys {unknown}"
        assert set(service["healthcheck"]) <= HEALTHCHECK_KEYS, name


def test_secrets_are_required_and_every_other_variable_has_a_default():
    """No password has a default anywhere: without .env, compose refuses to start, naming the variable
    and how to make the file; given the secrets, nothing else is needed."""
    compose(SECRETS_ENV)  # raises KeyError naming a ${VAR} without a default
    for name in SECRETS_ENV:
        with pytest.raises(Required, match=rf"^'?{name}: set it in \.env \(python3 docker/make-env\.py\)"):
            compose({k: v for k, v in SECRETS_ENV.items() if k != name})
        with pytest.raises(Required):
            compose({**SECRETS_ENV, name: ""})
    text = COMPOSE_FILE.read_text()
    for name in SECRETS_ENV:
        assert not re.search(rf"\$\{{{name}:?-", text), f"{name} has a default"


def test_no_default_password_anywhere_in_the_repository():
    """No file the repository tracks sets a password, auth string or secret key to a literal value."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(POSTGRES_PASSWORD|PREFECT_(SERVER_)?API_AUTH_STRING|MLFLOW_TRACKING_PASSWORD|"
                         r"MLFLOW_AUTH_ADMIN_PASSWORD|MLFLOW_FLASK_SERVER_SECRET_KEY|admin_password)\s*[:=]\s*"
                         r"[\"']?(?!\$\{)[A-Za-z0-9_]{3,}")
    hits = []
    for rel in tracked:
        path = REPO / rel
        if rel.startswith("tests/") or not path.is_file() or path.suffix in (".safetensors", ".png", ".parquet"):
            continue
        for n, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if pattern.search(line) and "os.environ" not in line and "secrets." not in line:
                hits.append(f"{rel}:{n}: {line.strip()}")
    assert not hits, hits


def test_both_servers_ask_for_credentials_and_the_runner_sends_them(env=SECRETS_ENV):
    services = compose(env)["services"]
    prefect = environment(services["prefect-server"])
    assert prefect["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    ml = services["mlflow"]
    assert option(service_command(ml), "--app-name") == "basic-auth"
    ml_env = environment(ml)
    assert (ml_env["MLFLOW_AUTH_ADMIN_USERNAME"], ml_env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == (
        env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    ini = on_mount(ml, ml_env["MLFLOW_AUTH_CONFIG_PATH"], "bind")
    text = (REPO / ini["source"]).read_text()
    assert ini["read_only"] and "admin_password" not in text.replace("# ", "")
    auth_db = re.search(r"^database_uri = sqlite:///(/\S+)$", text, re.M).group(1)
    assert on_mount(ml, str(Path(auth_db).parent), "volume"), "the users store outlives the container"
    assert re.search(r"pip install .*Flask-WTF==\d", (REPO / "docker" / "mlflow.Dockerfile").read_text())
    for name in RUNNERS:
        runner_env = environment(services[name])
        assert runner_env["PREFECT_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
        assert (runner_env["MLFLOW_TRACKING_USERNAME"], runner_env["MLFLOW_TRACKING_PASSWORD"]) == (
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])


def test_make_env_writes_every_secret_fresh(tmp_path):
    out = tmp_path / ".env"
    with open(out, "w") as f:
        subprocess.run([sys.executable, str(REPO / "docker" / "make-env.py")], stdout=f, check=True)
    again = subprocess.run([sys.executable, str(REPO / "docker" / "make-env.py")], capture_output=True, text=True,
                           check=True).stdout
    first = dict(line.split("=", 1) for line in out.read_text().splitlines())
    second = dict(line.split("=", 1) for line in again.splitlines())
    assert set(first) == set(SECRETS_ENV) and oct(out.stat().st_mode & 0o777) == "0o600"
    assert all(len(v) >= 3 for v in first.values())
    assert first["MLFLOW_TRACKING_PASSWORD"] != second["MLFLOW_TRACKING_PASSWORD"]
    assert first["PREFECT_API_AUTH_STRING"].startswith(first["MLFLOW_TRACKING_USERNAME"] + ":")
    compose(first)


@ENVS
def test_images_are_pinned(env):
    services = compose(env)["services"]
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            context = REPO / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            bases = dockerfile_bases(dockerfile)
            assert bases, f"{dockerfile}: no FROM"
            for base in bases:
                assert_pinned(base)
        else:
            assert_pinned(service["image"])
    assert re.fullmatch(r"postgres:16\.\d+(-\w+)?", services["postgres"]["image"]), "Postgres 16"
    assert re.fullmatch(r"prefecthq/prefect:3\.\d+\.\d+-python3\.\d+", services["prefect-server"]["image"])
    assert dockerfile_bases(REPO / "docker" / "mlflow.Dockerfile")[0].startswith("ghcr.io/mlflow/mlflow:v3.")


def test_clients_in_the_runner_image_match_the_servers():
    """A newer Prefect client can be refused by an older server: the runner pins the server's versions."""
    args = dockerfile_args(DOCKERFILE)
    prefect_image = raw_compose()["services"]["prefect-server"]["image"]
    assert prefect_image.split(":")[1].split("-python")[0] == args["PREFECT_VERSION"]
    mlflow_base = dockerfile_bases(REPO / "docker" / "mlflow.Dockerfile")[0]
    assert mlflow_base.split(":v")[1] == args["MLFLOW_VERSION"]
    pip_lines = [rest for instr, rest in dockerfile_instructions(DOCKERFILE) if instr == "RUN" and "pip install" in rest]
    assert any('"prefect==${PREFECT_VERSION}"' in r and '"mlflow==${MLFLOW_VERSION}"' in r for r in pip_lines)


def test_every_service_has_a_healthcheck_on_its_own_port():
    services = compose()["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: {test!r}"
        assert int(check["retries"]) >= 1 and check["interval"] and check["timeout"]
    text = healthcheck_text(services["postgres"])
    assert "pg_isready" in text and "-h 127.0.0.1" in text, "pg_isready over TCP (not the init server's socket)"
    for name, path in (("prefect-server", "/api/health"), ("mlflow", "/health")):
        port = int(option(service_command(services[name]), "--port"))
        assert f"http://127.0.0.1:{port}{path}'" in healthcheck_text(services[name]), name
    for name in RUNNERS:
        test = services[name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "python"], name
        assert int(services[name]["healthcheck"]["start_period"].rstrip("s")) >= 60, "atr serve needs start-up time"


def test_depends_on_waits_for_healthy_services_that_exist():
    services = compose()["services"]
    expected = {"postgres": set(), "prefect-server": {"postgres"}, "mlflow": {"postgres"},
                "runner": {"prefect-server", "mlflow"}, "runner-gpu": {"prefect-server", "mlflow"}}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must give conditions"
        assert set(depends) == expected[name], name
        for target, spec in depends.items():
            assert target in services and "profiles" not in services[target], f"{name} -> {target}"
            assert spec["condition"] == "service_healthy", f"{name} -> {target}"
            assert services[target]["healthcheck"]


@ENVS
def test_runner_environment_points_at_the_servers(env):
    services = compose(env)["services"]
    prefect_port = int(option(service_command(services["prefect-server"]), "--port"))
    mlflow_port = int(option(service_command(services["mlflow"]), "--port"))
    for name in RUNNERS:
        runner_env = environment(services[name])
        api = urlsplit(runner_env["PREFECT_API_URL"])
        assert (api.scheme, api.hostname, api.port, api.path) == ("http", "prefect-server", prefect_port, "/api")
        tracking = urlsplit(runner_env["MLFLOW_TRACKING_URI"])
        assert (tracking.scheme, tracking.hostname, tracking.port) == ("http", "mlflow", mlflow_port)
        assert tracking.path in ("", "/")
        # MLflow 3 checks the Host header: the one the runner sends must be allowed.
        allowed = option(service_command(services["mlflow"]), "--allowed-hosts").split(",")
        assert f"mlflow:{mlflow_port}" in allowed or "*" in allowed
        assert runner_env["ATR_HOME"] == "/data/atr"
        assert runner_env["HOME"] == "/home/atr"
        assert runner_env["HF_HOME"].startswith("/data/")
        threads = {runner_env[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATR_TORCH_THREADS")}
        assert len(threads) == 1 and int(threads.pop()) >= 1
        # the healthcheck looks for the deployment `atr serve --name` registers
        assert runner_env["ATR_DEPLOYMENT_NAME"] == option(service_command(services[name]), "--name")
    if env is CUSTOM_ENV:
        assert option(service_command(services["runner"]), "--cron") == env["ATR_CRON"]


@ENVS
def test_database_urls_match_the_postgres_service_and_init_script(env):
    services = compose(env)["services"]
    pg_env = environment(services["postgres"])
    init_sql = INIT_SQL.read_text()
    created = set(re.findall(r"^\s*CREATE DATABASE\s+(\w+)\s*;", init_sql, re.MULTILINE | re.IGNORECASE))
    urls = {"prefect-server": environment(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"],
            "mlflow": option(service_command(services["mlflow"]), "--backend-store-uri")}
    drivers = {"prefect-server": "postgresql+asyncpg", "mlflow": "postgresql+psycopg2"}
    databases = set()
    for name, url in urls.items():
        parts = urlsplit(url)
        assert parts.scheme == drivers[name], f"{name}: {parts.scheme}"
        assert (parts.hostname, parts.port) == ("postgres", 5432), name
        assert parts.username == pg_env["POSTGRES_USER"], name
        assert parts.password == pg_env["POSTGRES_PASSWORD"], name
        databases.add(parts.path.lstrip("/"))
    assert databases == {"prefect", "mlflow"} and databases <= created, (databases, created)
    if env is CUSTOM_ENV:
        assert pg_env["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    # the init script is mounted where the postgres entrypoint runs it
    (init_mount,) = [m for m in mounts(services["postgres"])
                     if m["type"] == "bind" and m["target"].startswith("/docker-entrypoint-initdb.d/")]
    assert (REPO / init_mount["source"]).resolve() == INIT_SQL.resolve()
    assert init_mount["target"].endswith(".sql") and init_mount["read_only"]
    # Prefect needs pg_trgm in its database; the mlflow image has the driver its URL names
    assert re.search(r"\\connect prefect\s+CREATE EXTENSION IF NOT EXISTS pg_trgm", init_sql)
    mlflow_dockerfile = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r"pip install .*psycopg2-binary==\d+\.\d+\.\d+", mlflow_dockerfile)
    healthcheck_db = re.search(r"-d (\w+)", healthcheck_text(services["postgres"])).group(1)
    assert healthcheck_db in created


@ENVS
def test_ports_match_the_server_commands(env):
    services = compose(env)["services"]
    for name in ("prefect-server", "mlflow"):
        port = int(option(service_command(services[name]), "--port"))
        assert option(service_command(services[name]), "--host") == "0.0.0.0", name
        ports = published_ports(services[name])
        assert [(hp, cp) for _, hp, cp in ports] == [(port, port)], f"{name}: {ports}"
        assert ports[0][0] == env.get("ATR_BIND_ADDRESS", "127.0.0.1")
    assert option(service_command(services["prefect-server"]), "--port") == "4200"
    assert option(service_command(services["mlflow"]), "--port") == "5000"
    assert "ports" not in services["postgres"], "the database is reachable from the stack only"
    for name in RUNNERS:
        assert "ports" not in services[name]


def test_named_volumes_are_declared_and_used_and_hold_the_state():
    data = compose()
    services = data["services"]
    declared = set(data.get("volumes") or {})
    used = {m["source"] for s in services.values() for m in mounts(s) if m["type"] == "volume"}
    assert used == declared, f"declared {declared}, used {used}"
    for service in services.values():
        for mount in mounts(service):
            if mount["type"] == "bind" and mount["target"] != "/config":
                assert (REPO / mount["source"]).exists(), mount
    assert on_mount(services["postgres"], "/var/lib/postgresql/data", "volume")
    artifacts = option(service_command(services["mlflow"]), "--artifacts-destination")
    assert on_mount(services["mlflow"], artifacts, "volume"), "MLflow artifacts on a volume"
    for name in RUNNERS:
        runner, runner_env = services[name], environment(services[name])
        for variable in ("ATR_HOME", "HF_HOME", "HOME"):
            assert on_mount(runner, runner_env[variable], "volume"), f"{name}: {variable} not on a volume"
        config_file = option(service_command(runner), "--config")
        config = on_mount(runner, config_file, "bind")
        assert config and config["read_only"] and config["bind"].get("create_host_path") is False


def test_gpu_profile_reserves_an_nvidia_gpu_and_a_cuda_torch():
    services = compose()["services"]
    gpu, cpu = services["runner-gpu"], services["runner"]
    assert gpu["profiles"] == ["gpu"] and "profiles" not in cpu
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and
               (d.get("count") == "all" or int(d.get("count", 0)) >= 1 or d.get("device_ids")) for d in devices)
    assert "deploy" not in cpu
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu["build"]["args"]["TORCH_INDEX_URL"])
    assert "TORCH_INDEX_URL" not in (cpu["build"].get("args") or {})
    assert dockerfile_args(DOCKERFILE)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    for key in ("command", "environment", "volumes", "depends_on", "healthcheck", "restart"):
        assert gpu[key] == cpu[key], f"runner-gpu differs from runner in {key}"
    assert gpu["build"]["context"] == cpu["build"]["context"]


# --- the runner image ---------------------------------------------------------------------------

def test_dockerfile_is_pinned_installs_the_package_and_runs_atr():
    instructions = dockerfile_instructions(DOCKERFILE)
    (base,) = dockerfile_bases(DOCKERFILE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    runs = [rest for instr, rest in instructions if instr == "RUN"]
    assert any('--index-url "${TORCH_INDEX_URL}"' in r and '"torch==${TORCH_VERSION}"' in r for r in runs)
    source_dir = next(dst for srcs, dst in copy_instructions(DOCKERFILE) if "pyproject.toml" in srcs).rstrip("/")
    assert any(re.search(rf"pip install {re.escape(source_dir)}(\s|$)", r) for r in runs), "pip install of the source"
    assert not any("pip install -e" in r or "--editable" in r for r in runs)
    (entrypoint,) = [json.loads(rest) for instr, rest in instructions if instr == "ENTRYPOINT"]
    assert entrypoint == ["atr"]
    users = [rest for instr, rest in instructions if instr == "USER"]
    assert users and users[-1] not in {"root", "0"}, "runs as a non-root user"
    env = {}
    for instr, rest in instructions:
        if instr == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
    assert env["ATR_HOME"] == "/data/atr" and env["HF_HOME"].startswith("/data/") and env["HOME"] == "/home/atr"
    runner_env = environment(compose()["services"]["runner"])
    assert {k: runner_env[k] for k in ("ATR_HOME", "HF_HOME", "HOME")} == {k: env[k] for k in ("ATR_HOME", "HF_HOME", "HOME")}
    # the compose healthcheck runs the script the image copies in
    script_dst = next(dst for srcs, dst in copy_instructions(DOCKERFILE) if "docker/runner-healthcheck.py" in srcs)
    assert compose()["services"]["runner"]["healthcheck"]["test"] == ["CMD", "python", script_dst]


def test_build_contexts_hold_what_the_dockerfiles_copy():
    context = build_context_files()
    for sources, _ in copy_instructions(DOCKERFILE):
        for source in sources:
            assert (REPO / source).exists(), source
            assert source in context or any(f.startswith(source.rstrip("/") + "/") for f in context), \
                f"{source} is excluded by .dockerignore"
    assert "pipeline/assets/tiny-trained/model.safetensors" in context
    for unwanted in (".venv/", ".git/", ".atr/", "tests/"):
        assert not any(f.startswith(unwanted) for f in context), f"{unwanted} in the build context"
    assert not any("__pycache__" in f for f in context)
    size = sum((REPO / f).stat().st_size for f in context)
    assert size < 50 * 2**20, f"build context is {size / 2**20:.0f} MiB"
    # the mlflow image's context: every file it copies exists (it copies none today)
    for name, service in compose()["services"].items():
        if "build" in service:
            ctx = REPO / service["build"]["context"]
            dockerfile = ctx / service["build"].get("dockerfile", "Dockerfile")
            for sources, _ in copy_instructions(dockerfile):
                assert all((ctx / s).exists() for s in sources), (name, sources)


def test_package_builds_from_the_files_the_dockerfile_copies(tmp_path):
    """`pip install` in the image sees only what COPY brought in: that must build a complete package."""
    image_tree(tmp_path / "image")
    source_dir = next(dst for srcs, dst in copy_instructions(DOCKERFILE) if "pyproject.toml" in srcs)
    src = tmp_path / "image" / source_dir.strip("/")
    assert (src / "pyproject.toml").is_file() and (src / "pipeline" / "__init__.py").is_file()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("atr-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline" / "assets").rglob("*") if p.is_file()}
        assert shipped and shipped <= names, f"assets missing from the wheel: {sorted(shipped - names)}"
        for package in ("pipeline", "storage", "flows"):
            assert f"{package}/__init__.py" in names
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^atr = flows\.cli:main$", entry_points, re.MULTILINE)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert wheel.name.startswith(f"atr-{version}-")


@ENVS
def test_runner_command_is_accepted_by_atr_serve(env):
    from flows.cli import build_parser

    for name in RUNNERS:
        argv = service_command(compose(env)["services"][name])
        args = build_parser().parse_args(argv)
        assert args.command == "serve"
        assert args.cron == env.get("ATR_CRON", "0 3 * * *")
        assert args.config == "/config/run.toml"
        assert args.name == env.get("ATR_DEPLOYMENT_NAME", "nightly")
    assert build_parser().parse_args(["serve", "--cron", "0 3 * * *", "--config", "/config/run.toml"]).command == "serve"
    # the compose default name is the CLI's, so `atr serve` without --name serves the same deployment
    assert build_parser().parse_args(["serve"]).name == "nightly"


# --- the runner's healthcheck, against a real Prefect server -------------------------------------

def _healthcheck(api_url: str, deployment: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "PREFECT_API_URL": api_url, "ATR_DEPLOYMENT_NAME": deployment}
    # -I -S: no site-packages, as the script must need nothing beyond the standard library
    return subprocess.run([sys.executable, "-I", "-S", str(HEALTHCHECK_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_runner_healthcheck_script_against_a_real_prefect_server(prefect_api_url):
    from prefect.client.orchestration import get_client

    name = "compose-healthcheck-test"
    down = _healthcheck("http://127.0.0.1:9/api", name)
    assert down.returncode == 1 and "unreachable" in down.stdout, down.stdout + down.stderr
    missing = _healthcheck(prefect_api_url, name)
    assert missing.returncode == 1 and f"no deployment {name!r}" in missing.stdout, missing.stdout + missing.stderr
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("compose-healthcheck-flow")
        client.create_deployment(flow_id=flow_id, name=name)
    up = _healthcheck(prefect_api_url, name)
    assert up.returncode == 0 and up.stdout.startswith("healthy:"), up.stdout + up.stderr
    assert _healthcheck(prefect_api_url, "some-other-deployment").returncode == 1


# --- docs/compose.md and the real `docker compose` where it exists ----------------------------------

def test_compose_page_documents_the_stack():
    page = (REPO / "docs" / "compose.md").read_text()
    for needle in ("docker compose up -d", "docker compose --profile gpu up -d runner-gpu", "http://localhost:4200",
                   "http://localhost:5000", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "tests/test_compose.py"):
        assert needle in page, needle
    assert "](docs/compose.md)" in (REPO / "README.md").read_text()


def _compose_plugin() -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed here")
def test_docker_compose_config_accepts_the_file(tmp_path):
    env = {**os.environ, "ATR_CONFIG_DIR": str(tmp_path)}
    for profile in ([], ["--profile", "gpu"]):
        result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), *profile, "config", "--quiet"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
