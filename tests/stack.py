"""The compose stack's services run natively, for tests/test_stack.py.

PostgreSQL from Debian's packages (``/usr/lib/postgresql/*/bin``), the Prefect server and the
MLflow server with the commands and environment variables ``docker-compose.yml`` gives them:
:func:`compose_services` reads the file (through test_compose's interpolation, with the secrets a
``.env`` from ``docker/make-env.py`` would hold) and only swaps the in-network addresses
(``postgres:5432``, ``0.0.0.0:4200``, ``/mlartifacts``, ``/mlauth``) for local ones. Everything
listens on 127.0.0.1, on free ports. Each service has ``start``, ``stop`` and ``restart``.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def http(url: str, auth: str | None = None, body: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """(status, body) of a GET (or a JSON POST); ``auth`` is "user:password" for basic auth."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST", headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, what: str, proc: subprocess.Popen | None = None, timeout: float = 180.0,
              log: Path | None = None) -> float:
    """Seconds until ``url`` answers 200; a dead process or a timeout fails with its log's tail."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if http(url, timeout=3)[0] == 200:
                return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} in {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path | None, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.exists() else ""


class Postgres:
    """A PostgreSQL cluster of its own (initdb), owned by the ``postgres`` user when run as root."""

    def __init__(self, user: str, password: str):
        self.bin = pg_bin()
        self.user, self.password, self.port = user, password, free_port()
        # postgres must reach its directory: pytest's tmp dirs are private to root
        self.root = Path(tempfile.mkdtemp(prefix="atr-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.as_root = os.geteuid() == 0

    def _run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else list(argv)
        return subprocess.run(cmd, capture_output=True, text=True, check=True, **kw)

    def start(self) -> float:
        t0 = time.monotonic()
        if not self.data.exists():
            pw = self.root / "pw"
            pw.write_text(self.password)
            if self.as_root:
                shutil.chown(self.root, "postgres")
                shutil.chown(pw, "postgres")
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pw}",
                      "-A", "scram-sha-256", "-E", "UTF8")
            pw.unlink()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")
        return time.monotonic() - t0

    def psql(self, *args: str, db: str = "postgres") -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        out = subprocess.run([str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
                              "-d", db, "-v", "ON_ERROR_STOP=1", *args], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"psql {args}: {out.stderr}")
        return out.stdout

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> float:
        t0 = time.monotonic()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "-l",
                  str(self.log), "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "restart")
        return time.monotonic() - t0

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class Server:
    """A server process (Prefect or MLflow) with its command line and environment."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], health: str, log: Path):
        self.name, self.argv, self.env, self.health, self.log = name, argv, env, health, log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> float:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return wait_http(self.health, self.name, self.proc, timeout, self.log)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def compose_services(tmp: Path, secrets: dict[str, str]):
    """(postgres, prefect, mlflow, runner_env): the stack's three servers built from docker-compose.yml,
    and the runner service's environment with local addresses."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_compose import compose, environment, option, service_command

    services = compose(secrets)["services"]
    pg_env = environment(services["postgres"])
    pg = Postgres(pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
    local_pg = f"@127.0.0.1:{pg.port}/"

    def localize(text: str) -> str:
        return text.replace("@postgres:5432/", local_pg)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    base["PATH"] = f"{BIN}:{base.get('PATH', '')}"

    # Prefect: the compose command and environment; the API's port and host made local
    p_cmd = service_command(services["prefect-server"])
    p_port = free_port()
    p_argv = [str(BIN / "prefect"), *p_cmd[1:]]
    p_argv[p_argv.index("--host") + 1] = "127.0.0.1"
    p_argv[p_argv.index("--port") + 1] = str(p_port)
    p_env = {**base, **{k: localize(v) for k, v in environment(services["prefect-server"]).items()},
             "PREFECT_HOME": str(tmp / "prefect-server-home"), "PREFECT_UI_API_URL": f"http://127.0.0.1:{p_port}/api",
             "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    prefect = Server("prefect server", p_argv, p_env, f"http://127.0.0.1:{p_port}/api/health", tmp / "prefect.log")
    prefect.api = f"http://127.0.0.1:{p_port}/api"

    # MLflow: the compose command; /mlartifacts and the auth ini's /mlauth store made local
    m_cmd = [localize(a) for a in service_command(services["mlflow"])]
    m_port = free_port()
    m_argv = [str(BIN / "mlflow"), *m_cmd[1:]]
    m_argv[m_argv.index("--host") + 1] = "127.0.0.1"
    m_argv[m_argv.index("--port") + 1] = str(m_port)
    m_argv[m_argv.index("--artifacts-destination") + 1] = str(tmp / "mlartifacts")
    m_env = {**base, **environment(services["mlflow"])}
    ini_src = REPO / "docker" / "mlflow" / "basic_auth.ini"
    ini = tmp / "basic_auth.ini"
    ini.write_text(ini_src.read_text().replace("sqlite:////mlauth/", f"sqlite:///{tmp}/mlauth-"))
    m_env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    mlflow = Server("mlflow server", m_argv, m_env, f"http://127.0.0.1:{m_port}/health", tmp / "mlflow.log")
    mlflow.uri = f"http://127.0.0.1:{m_port}"
    assert option(m_argv, "--app-name") == "basic-auth"

    runner = environment(services["runner"])
    runner.update(PREFECT_API_URL=prefect.api, MLFLOW_TRACKING_URI=mlflow.uri)
    return pg, prefect, mlflow, runner


def init_databases(pg: Postgres) -> None:
    """docker/postgres/init.sql, as the postgres image's entrypoint runs it on the first start."""
    pg.psql("-f", str(REPO / "docker" / "postgres" / "init.sql"))


__all__ = ["Postgres", "Server", "compose_services", "init_databases", "free_port", "pg_bin", "http", "wait_http"]
