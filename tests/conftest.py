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
    from pipeline.loading import load_model

    return load_model(tiny_stage.model_dir)


@pytest.fixture
def cli_env(prefect_api_url, tmp_path):
    """Environment for `atr` (in this process, ``atr_in_process``, or a subprocess): the session's Prefect
    server, a fresh home."""
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
    from pipeline.loading import load_model

    return load_model(trained_stage.model_dir)


# ----------------------------------------------------------------------------- `atr` in this process
#
# A `python -m flows.cli` subprocess re-imports torch, transformers, Prefect and MLflow (several
# seconds each time). `atr_in_process` calls ``flows.cli.main`` here instead, as a fresh process
# would see it: ``env`` is the whole environment and the cwd for the call, stdout and stderr are
# captured at the file-descriptor level (C-level writes and logging handlers included), warnings
# print as in a fresh interpreter, and the process-wide state main() changes (os.environ: ATR_HOME
# and runtime.configure's defaults; logger levels; warning filters; torch's thread count; MLflow's
# warned-once set) is put back afterwards, so test order does not matter. Prefect's settings are
# read once per process: the in-process call talks to this session's test server (conftest
# ``prefect_api_url``), the one ``cli_env``'s PREFECT_API_URL names. Tests whose point is the
# process itself (the console script, kill-and-resume, settings read at process start, several
# processes at once) still start one.

import warnings as _warnings  # noqa: E402


def _print_warning(msg) -> None:
    """The warnings module's own printer (``warnings._showwarnmsg_impl``), which pytest swaps for a recorder."""
    import sys

    file = msg.file if msg.file is not None else sys.stderr
    if file is not None:
        try:
            file.write(_warnings._formatwarnmsg(msg))
        except OSError:
            pass


# The loggers Prefect's logging.yml sets from PREFECT_LOGGING_LEVEL when it is imported; a fresh `atr`
# process imports Prefect after runtime.configure has chosen that level.
_PREFECT_LEVEL_LOGGERS = ("prefect", "prefect.extra", "prefect.client", "prefect.infrastructure")


def _fresh_warning_filters() -> None:
    """CPython's filters in a fresh process started without -W or -X dev."""
    _warnings.resetwarnings()
    _warnings.filterwarnings("default", category=DeprecationWarning, module="__main__", append=True)
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        _warnings.filterwarnings("ignore", category=category, append=True)


class _FdCapture:
    """stdout and stderr of this process into two temporary files, at the fd level."""

    def __enter__(self):
        import io
        import logging
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        self.files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        self.saved_fds = [os.dup(1), os.dup(2)]
        self.saved_sys = (sys.stdout, sys.stderr)
        for fd, f in zip((1, 2), self.files):
            os.dup2(f.fileno(), fd)
        self.streams = [io.TextIOWrapper(open(fd, "wb", buffering=0, closefd=False), encoding="utf-8",
                                         errors="backslashreplace", write_through=True) for fd in (1, 2)]
        sys.stdout, sys.stderr = self.streams
        # Handlers made earlier hold the stdout or stderr of their day: the process's, or pytest's capture of
        # it (global or a test's capsys). Not pytest's own log-capturing handlers (caplog): not the terminal.
        std = {id(s) for s in (sys.__stdout__, sys.__stderr__, *self.saved_sys)}
        self.handlers = []
        # pytest's log capture sits on the root logger; a fresh process has only what it configured
        # (Prefect's console handler), or logging's last resort: stderr.
        root = logging.getLogger()
        self.pytest_handlers = [h for h in root.handlers if type(h).__module__ == "_pytest.logging"]
        for h in self.pytest_handlers:
            root.removeHandler(h)
        try:
            for ref in list(logging._handlerList):
                h = ref()
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and h.stream \
                        and not isinstance(getattr(type(h), "stream", None), property) \
                        and (id(h.stream) in std or type(h.stream).__module__ == "_pytest.capture"):
                    to_out = h.stream is sys.__stdout__ or h.stream is self.saved_sys[0]
                    new = self.streams[0] if to_out else self.streams[1]
                    console = getattr(h, "console", None)  # Prefect's rich console handler writes through it
                    self.handlers.append((h, h.stream, console, getattr(console, "file", None)))
                    h.stream = new
                    if console is not None:
                        console.file = new
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        import logging
        import sys

        for s in self.streams:
            s.flush()
        for h, stream, console, file in self.handlers:
            h.stream = stream
            if console is not None:
                console.file = file
        for h in self.pytest_handlers:
            logging.getLogger().addHandler(h)
        sys.stdout, sys.stderr = self.saved_sys
        for fd, saved in zip((1, 2), self.saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        texts = []
        for f in self.files:
            f.seek(0)
            texts.append(f.read().decode("utf-8", "replace"))
            f.close()
        self.stdout, self.stderr = texts
        return False


def atr_in_process(argv, env, cwd=REPO):
    """`atr argv` with environment ``env`` (all of it, e.g. ``cli_env``), run by ``flows.cli.main`` in this
    process; a ``subprocess.CompletedProcess`` with its exit code, stdout and stderr."""
    import contextlib
    import logging
    import subprocess
    import sys
    import traceback

    import flows.cli
    from flows import runtime

    if "serve" in map(str, argv) and not env.get("PREFECT_API_URL"):
        # `atr serve` falls back on Prefect's settings, which this process read at its start: it would
        # serve forever against the session's server instead of failing. A fresh process tells.
        raise AssertionError("`atr serve` without PREFECT_API_URL: run it in a process (in_process=False)")
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    loggers = [logging.getLogger(), *(lg for lg in list(logging.Logger.manager.loggerDict.values())
                                      if isinstance(lg, logging.Logger))]
    levels = [(lg, lg.level) for lg in loggers]
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    tracking = sys.modules.get("storage.tracking")
    warned = tracking.Tracker._warned if tracking else None
    configure = runtime.configure

    def configure_then_levels(*a, **k):
        configure(*a, **k)
        level = os.environ["PREFECT_LOGGING_LEVEL"].upper()
        # Prefect read its settings when this process imported it; a server app created during the
        # command (the first in a session) re-applies logging from them: give them the command's level.
        from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

        scoped.enter_context(temporary_settings(updates={PREFECT_LOGGING_LEVEL: level}))
        for name in _PREFECT_LEVEL_LOGGERS:
            logging.getLogger(name).setLevel(level)

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    if tracking:
        tracking.Tracker._warned = set()
    runtime.configure = configure_then_levels
    try:
        with contextlib.ExitStack() as scoped, _warnings.catch_warnings(), _FdCapture() as cap:
            _fresh_warning_filters()
            _warnings.showwarning, _warnings._showwarnmsg_impl = _warnings._showwarning_orig, _print_warning
            try:
                rc = flows.cli.main([str(a) for a in argv])
            except SystemExit as exc:  # argparse: usage errors and --help
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if not isinstance(exc.code, (int, type(None))):
                    print(exc.code, file=sys.stderr)
            except BaseException:  # what the interpreter does with an uncaught exception (--verbose)
                traceback.print_exc()
                rc = 1
    finally:
        runtime.configure = configure
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for lg, level in levels:
            lg.setLevel(level)
        if torch and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        tracking = sys.modules.get("storage.tracking")
        if tracking:
            tracking.Tracker._warned = warned if warned is not None else set()
    return subprocess.CompletedProcess(["atr", *map(str, argv)], rc, cap.stdout, cap.stderr)


def _restore_environ(saved: dict) -> None:
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True, scope="module")
def _module_leaves_the_environment_as_found():
    """A test module that calls ``flows.cli.main`` itself (runtime.configure writes ATR_HOME and its
    defaults into os.environ), e.g. from a module fixture, leaves the next module the environment it found."""
    saved = dict(os.environ)
    yield
    _restore_environ(saved)


@pytest.fixture(autouse=True)
def _test_leaves_the_environment_as_found():
    saved = dict(os.environ)
    yield
    _restore_environ(saved)


@pytest.fixture
def run_cli(cli_env):
    """``run_cli(*argv, **env_overrides) -> (exit code, stdout, stderr)``: `atr argv` in this process with
    ``cli_env`` (the session's Prefect server, a fresh ATR_HOME) plus the overrides."""
    def run(*argv, **overrides):
        proc = atr_in_process(argv, {**cli_env, **overrides})
        return proc.returncode, proc.stdout, proc.stderr

    return run


def assert_one_line_errors(cases, env, cwd=REPO, in_process=True):
    """Each ``(argv, needle)``: `atr argv` exits 2 with a last stderr line `error: ...needle...`, no traceback.
    Run in this process (``atr_in_process``; tests/test_cli.py runs the console script itself), or with
    ``in_process=False`` in a `python -m flows.cli` process: for what a process reads when it starts."""
    import subprocess
    import sys

    for argv, needle in cases:
        if in_process:
            proc = atr_in_process(argv, env, cwd)
        else:
            proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=cwd, env=env, capture_output=True,
                                  text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (argv, proc.stderr)
        assert lines[-1].startswith("error: ") and needle in lines[-1], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr


# tiny-qwen25 (random weights) prepared in the session home and loaded once per module (Qwen eval and selector tests)
@pytest.fixture(scope="module")
def qwen_stage(session_home):
    from flows.stages.prepare_model import prepare_model

    return prepare_model(session_home, "tiny-qwen25")


@pytest.fixture(scope="module")
def qwen_model(qwen_stage):
    from pipeline.loading import load_model

    model, processor = load_model(qwen_stage.model_dir)
    return model.eval(), processor
