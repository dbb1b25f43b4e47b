"""Session set-up: offline, project-local Prefect, one Prefect test server, one tiny model.

Environment variables are set before anything imports prefect, torch or
huggingface_hub, because those read them at import time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# pytest imports this file as ``conftest``; a test that imports it under another name
# (``tests.conftest``) would run this body again and point the environment at a second
# directory that this session's Prefect settings never read. The pid-tagged variable makes
# a second import in the same process reuse the first one's directory.
if os.environ.get("ATR_TESTS_PID") == str(os.getpid()):
    _SESSION_TMP = Path(os.environ["ATR_TESTS_TMP"])
else:
    _SESSION_TMP = Path(tempfile.mkdtemp(prefix="atr-tests-"))
    os.environ["ATR_TESTS_PID"], os.environ["ATR_TESTS_TMP"] = str(os.getpid()), str(_SESSION_TMP)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_SESSION_TMP / "prefect" / "results")
# One torch process computes at a time in this suite (subprocess tests wait idle),
# so OpenMP keeps its default wait policy; see flows/runtime.py.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("ATR_HOME", None)

import pytest  # noqa: E402

from pipeline.compat import torchvision_guard  # noqa: E402

torchvision_guard()  # the [lmms] venv: torchvision's CUDA-only extension on the CPU torch wheel

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_api_url():
    """One Prefect test server for the whole session; yields its API URL (for subprocesses too)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    from storage.home import Home

    return Home.resolve(tmp_path_factory.mktemp("home")).ensure()


@pytest.fixture(scope="session")
def tiny_stage(session_home):
    """The tiny preset, prepared once per session through the real prepare-model stage."""
    from flows.stages.prepare_model import prepare_model

    return prepare_model(session_home, "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_stage):
    from pipeline.presets import load_model

    return load_model(tiny_stage.model_dir)


@pytest.fixture
def cli_env(prefect_api_url, tmp_path):
    """Environment for `atr` subprocesses: the session's Prefect server, a fresh home."""
    env = dict(os.environ)
    env["PREFECT_API_URL"] = prefect_api_url
    env["ATR_HOME"] = str(tmp_path / "home")
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.pop("PREFECT_LOGGING_LEVEL", None)  # as a user runs it: the CLI picks its own log level
    return env


@pytest.fixture(scope="session")
def trained_stage(session_home):
    """tiny-trained through the real prepare-model stage: the shipped checkpoint, copied."""
    from flows.stages.prepare_model import prepare_model

    return prepare_model(session_home, "tiny-trained")


@pytest.fixture(scope="session")
def trained_model(trained_stage):
    from pipeline.presets import load_model

    return load_model(trained_stage.model_dir)


def assert_one_line_errors(cases, env, cwd=REPO):
    """Each ``(argv, needle)``: `atr argv` exits 2 with a last stderr line `error: ...needle...`, no traceback."""
    import subprocess
    import sys

    for argv, needle in cases:
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (argv, proc.stderr)
        assert lines[-1].startswith("error: ") and needle in lines[-1], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
