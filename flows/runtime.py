"""Process environment for every `atr` entry point, set before Prefect or torch load.

* PREFECT_HOME lives under $ATR_HOME (project-local, nothing in ~/.prefect);
  Prefect's analytics are off.
* Thread counts: $ATR_TORCH_THREADS, else $OMP_NUM_THREADS, else one per core
  (``pipeline.device.thread_count``). The one compute process
  keeps OpenMP's default (spinning) wait policy: PASSIVE made selector training
  1.7x slower here. Worker processes that run beside others (Dask workers,
  parallel tests) must use ``WORKER_ENV`` (OMP_WAIT_POLICY=PASSIVE, 1 thread):
  with several torch processes on 2 shared CPUs, spinning threads were measured
  15-100x slower. Dask workers that each drive one GPU share the cores out instead
  (``gpu_worker_env``).
* Hugging Face progress bars are off; our own progress bars report instead.
"""

from __future__ import annotations

import logging
import os
import warnings

from pipeline.errors import UserError
from storage.home import Home


def configure(home: Home, verbose: bool = False) -> None:
    """Set the environment for ``home``. Idempotent; call before importing prefect."""
    home.ensure()
    os.environ["ATR_HOME"] = str(home.root)
    os.environ.setdefault("PREFECT_HOME", str(home.prefect))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect logs a failing flow's traceback at ERROR; the CLI prints its own one-line error instead.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home.prefect / "results"))
    # The temporary local server migrates a fresh database on first start; on a busy
    # 2-CPU machine that was seen to exceed Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A Prefect server whose database restarts answers 500 until it reconnects. Prefect's client
    # retries 502/503/429 (5 times, 2-32 s apart) but not 500: a run whose final state report met
    # the outage died with the work done, and stayed RUNNING on the server (tests/test_stack.py).
    os.environ.setdefault("PREFECT_CLIENT_RETRY_EXTRA_CODES", "500")
    # A tracking server that is down should cost seconds, not MLflow's default 7 retries with
    # exponential backoff and 120 s timeouts (minutes per call): the tracker then goes offline
    # (storage/tracking.py) and the command completes on DuckDB.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # MLflow prints a "View run ... at: URL" line per finished run on a tracking server: one per
    # stage and per replayed run, drowning atr's own output (reports name the runs).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Dask's scheduler/nanny INFO lines (cluster start, worker joins) drown the progress bar.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "info" if verbose else "warning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    for name in ("alembic", "mlflow", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from pipeline.compat import torchvision_guard

    torchvision_guard()  # before anything imports transformers (the [lmms] extra on the CPU torch wheel)
    from pipeline.device import set_torch_threads

    set_torch_threads()


WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "ATR_TORCH_THREADS": "1"}


def gpu_worker_env(workers: int, cpus: int | None = None) -> dict[str, str]:
    """``WORKER_ENV`` for one of ``workers`` processes that each drive one GPU: still PASSIVE, but the
    machine's cores shared out between them, since a GPU worker's CPU work (image decoding and resizing,
    the processor, strategies' CPU steps) runs on torch and OpenMP threads while its GPU waits."""
    threads = str(max(1, (cpus or os.cpu_count() or 1) // max(1, workers)))
    return {**WORKER_ENV, "OMP_NUM_THREADS": threads, "ATR_TORCH_THREADS": threads}


class PrefectServerError(UserError):
    """The Prefect server named by PREFECT_API_URL cannot be used (one line with its URL)."""


def check_prefect_server(api_url: str, timeout: float = 10.0) -> None:
    """One line instead of a Prefect traceback when ``api_url`` does not answer or refuses the
    credentials: ``/health`` (open even with auth on) must answer, then an authenticated read must
    not be refused. The credentials are PREFECT_API_AUTH_STRING ("user:password"), as Prefect's
    client sends them."""
    import base64
    import json
    import urllib.error
    import urllib.request

    api = api_url.rstrip("/")

    def call(path: str, body: dict | None = None) -> None:
        req = urllib.request.Request(f"{api}{path}", data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
        auth = os.environ.get("PREFECT_API_AUTH_STRING")
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout):
            pass

    try:
        call("/health")
    except urllib.error.HTTPError as exc:
        raise PrefectServerError(f"the Prefect server at {api} answered {exc.code} {exc.reason} to /health") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrefectServerError(f"no Prefect server answers at {api} ({reason}); start it or fix "
                                 "PREFECT_API_URL") from None
    try:
        call("/flows/filter", {"limit": 1})
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            who = os.environ.get("PREFECT_API_AUTH_STRING")
            raise PrefectServerError(
                f"the Prefect server at {api} refused the credentials (PREFECT_API_AUTH_STRING "
                f"{'for user ' + repr(who.split(':', 1)[0]) if who else 'is not set'})") from None
        raise PrefectServerError(f"the Prefect server at {api} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PrefectServerError(f"the Prefect server at {api} stopped answering "
                                 f"({getattr(exc, 'reason', exc)})") from None
