"""Process environment for every `atr` entry point, set before Prefect or torch load.

* PREFECT_HOME lives under $ATR_HOME (project-local, nothing in ~/.prefect);
  Prefect's analytics are off.
* Thread counts: torch gets at most the machine's cores. The one compute process
  keeps OpenMP's default (spinning) wait policy: PASSIVE made selector training
  1.7x slower here. Worker processes that run beside others (Dask workers,
  parallel tests) must use ``WORKER_ENV`` (OMP_WAIT_POLICY=PASSIVE, 1 thread):
  with several torch processes on 2 shared CPUs, spinning threads were measured
  15-100x slower.
* Hugging Face progress bars are off; our own progress bars report instead.
"""

from __future__ import annotations

import logging
import os
import warnings

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
    # A tracking server that is down should cost seconds, not MLflow's default 7 retries with
    # exponential backoff and 120 s timeouts (minutes per call): the tracker then goes offline
    # (storage/tracking.py) and the command completes on DuckDB.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
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
