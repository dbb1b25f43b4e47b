"""Reproducible installs: constraints.txt (the lock) matches pyproject.toml, a lock that does not is one line
naming the file and the package, CI and the README install through it, and `atr --version` names what is
installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from conftest import REPO

LOCK = REPO / "constraints.txt"


def lock_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / ".ci" / "lock"), "--check", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_the_lock_matches_pyproject_and_pins_what_is_installed():
    proc = lock_check()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "lock: constraints.txt matches pyproject.toml"
    pins = {canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", LOCK.read_text(), re.M)}
    assert pins["torch"] == "2.13.0" and "atr" not in pins  # the project itself is never locked
    for extra in ("lmms-eval", "torchvision"):  # the [lmms] extra's install is locked too
        assert extra in pins
    # This venv was installed by the README's command, so the lock's versions are the ones under test.
    for name in ("transformers", "prefect", "mlflow", "duckdb", "webdataset", "pyarrow", "numpy"):
        assert version(name) == pins[name], name


@pytest.fixture
def broken(tmp_path):
    """A copy of pyproject.toml and the lock to break: ``broken(edit_lock, edit_pyproject) -> stderr lines``."""
    pyproject, lock = tmp_path / "pyproject.toml", tmp_path / "constraints.txt"

    def run(lock_edit=lambda s: s, pyproject_edit=lambda s: s) -> list[str]:
        pyproject.write_text(pyproject_edit((REPO / "pyproject.toml").read_text()))
        lock.write_text(lock_edit(LOCK.read_text()))
        proc = lock_check("--pyproject", str(pyproject), "--lock", str(lock))
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert all(line.startswith(f"error: {lock}") for line in lines), lines
        return lines

    return run


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def drop(name):
    """Remove ``name``'s pin (however the lock spells it: lmms_eval, lmms-eval)."""
    return lambda s: "".join(line for line in s.splitlines(keepends=True)
                             if canonical(line.split("==")[0]) != name)


def pin(name, v):
    return lambda s: "".join(f"{name}=={v}\n" if canonical(line.split("==")[0]) == name else line
                             for line in s.splitlines(keepends=True))


def test_a_lock_that_does_not_match_pyproject_is_one_line_naming_the_file_and_package(broken):
    (line,) = broken(drop("transformers"))
    assert "transformers (pyproject.toml's dependencies: transformers<6,>=5.0) is not pinned" in line
    assert line.endswith("refresh the lock with .ci/lock")
    (line,) = broken(pin("transformers", "4.57.1"))
    assert "transformers==4.57.1 is outside pyproject.toml's dependencies' range transformers<6,>=5.0" in line
    (line,) = broken(drop("lmms-eval"))  # an extra's dependency, as the [lmms] install needs it
    assert "lmms-eval (pyproject.toml [project.optional-dependencies] lmms: lmms-eval==0.7.3) is not pinned" in line
    (line,) = broken(drop("pytest-timeout"))
    assert "pytest-timeout ([project.optional-dependencies] dev" in line.replace("pyproject.toml ", "")
    # pyproject.toml moves on without the lock: a raised floor the locked version is below.
    (line,) = broken(pyproject_edit=lambda s: s.replace('"duckdb>=1.1"', '"duckdb>=99"'))
    assert re.search(r"duckdb==[\d.]+ is outside pyproject.toml's dependencies' range duckdb>=99", line)
    lines = broken(lambda s: drop("numpy")(pin("pillow", "9.0.0")(s)))  # each problem is its own line
    assert len(lines) == 2 and "numpy" in lines[0] + lines[1] and "pillow==9.0.0" in lines[0] + lines[1]


def test_a_malformed_or_missing_lock_is_one_line(broken, tmp_path):
    (line,) = broken(lambda s: s + "rich>=13\n")
    assert re.search(r"constraints.txt:\d+: not a 'name==version' pin: 'rich>=13'", line)
    (line,) = broken(lambda s: s + "Rich==1\n")
    assert "Rich is pinned twice" in line
    shutil.copy(REPO / "pyproject.toml", tmp_path / "p.toml")
    proc = lock_check("--pyproject", str(tmp_path / "p.toml"), "--lock", str(tmp_path / "none.txt"))
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path / 'none.txt'}: no lock file; create it with .ci/lock\n"


def test_ci_checks_the_lock_first_then_runs_the_readme_commands_verbatim():
    readme, ci = (REPO / "README.md").read_text(), (REPO / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = next(b for b in blocks if b.endswith("&& python -m pytest"))
    assert "pip install -q torch==2.13.0 -c constraints.txt -e '.[dev]'" in test_cmd
    assert "pip install torch==2.13.0 -c constraints.txt -e '.[dev]' && atr run" in blocks[0]
    assert "pip install torch==2.13.0 -c constraints.txt -e '.[dev,lmms]'" in readme
    body = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    check = next(i for i, line in enumerate(body) if ".ci/lock --check" in line)
    run = next(i for i, line in enumerate(body) if line.strip() == test_cmd)
    lmms = next(i for i, line in enumerate(body) if "-c constraints.txt -e '.[dev,lmms]'" in line)
    assert check < run < lmms


def test_version_names_atr_torch_and_transformers_without_importing_them():
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit as e:\n"
            "    print([m for m in ('torch', 'transformers', 'prefect') if m in sys.modules]); sys.exit(e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [
        f"atr {version('atr')} (torch {version('torch')}, transformers {version('transformers')})", "[]"]
    assert version("atr") == re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]


def test_the_runner_image_installs_through_the_lock_with_its_pins():
    """The Dockerfile's torch, Prefect and MLflow pins (the last two match the compose stack's servers) must be
    the lock's, or `pip install -c constraints.txt` in the image cannot resolve."""
    dockerfile = (REPO / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M))
    pins = {canonical(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", LOCK.read_text(), re.M)}
    assert (args["TORCH_VERSION"], args["PREFECT_VERSION"], args["MLFLOW_VERSION"]) == \
        (pins["torch"], pins["prefect"], pins["mlflow"]), "refresh the compose stack's versions with the lock"
    assert re.search(r"^RUN pip install /tmp/atr-src -c /tmp/atr-src/constraints.txt ", dockerfile, re.M)
    assert "!constraints.txt" in (REPO / ".dockerignore").read_text().splitlines()
