"""MLflow adapter: an explicit-client tracker (no fluent global/active-run state).

By default runs go to a sqlite database under the pipeline home and artifacts
to `{home}/mlartifacts`; MLFLOW_TRACKING_URI overrides the tracking store.

**Nothing is lost when a tracking server is down.** A remote server that does not
answer (at start, or in the middle of a run) turns the tracker *offline*: it warns
once, in one line, and from then on writes every call (start a run, params,
metrics, an artifact's path, end a run) to a spool file under
``{home}/mlflow-spool/``, with stand-in run ids (``offline-…``). The DuckDB store
records the run as usual, with the stand-in id. ``atr sync`` (:func:`replay`)
later plays the spool against the server in the order the calls were made, so
the MLflow runs get the same params, metrics, artifacts and parent/child
structure they would have had, and the DuckDB rows get the real ids. A replay
notes each call it has played, so an interrupted one resumes without repeats and
a second ``atr sync`` changes nothing. A server that refuses the credentials
fails the command in one line naming it: a wrong password is a mistake to fix,
not an outage to ride out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from pipeline.errors import UserError

_REMOTE_SCHEMES = ("http://", "https://", "databricks")
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
OFFLINE_PREFIX = "offline-"
SPOOL = "mlflow-spool"
# what a request that never reached the server says (requests/urllib3, through MlflowException)
_UNREACHABLE = ("Max retries exceeded", "Connection refused", "Failed to establish", "Connection aborted",
                "Read timed out", "RemoteDisconnected", "Name or service not known", "timed out")


class TrackingError(UserError, RuntimeError):
    """A tracking problem to report in one line (``atr sync`` while the server is down, a damaged spool)."""


class TrackingAuthError(TrackingError):
    """The tracking server refused the credentials (one line, naming it)."""


def _unreachable(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)) or (
        isinstance(exc, MlflowException) and any(m in str(exc) for m in _UNREACHABLE))


def _refused(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MlflowException) and any(f"error code {c}" in text or f"status code {c}" in text
                                                     for c in (401, 403))


def tracking_uri(home: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite database in `home`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve()}/mlflow.db"


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    """Flatten nested mappings into dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _param_value(value: object) -> str:
    """Stringify a param value, truncated to MLflow's length limit."""
    text = json.dumps(list(value), default=str) if isinstance(value, (list, tuple)) else str(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 3] + "..."


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Tracker:
    """Logs runs, params, metrics and artifacts to one MLflow experiment (offline: to the spool)."""

    _warned: set[str] = set()  # tracking URIs already warned about, once per process

    def __init__(self, home: Path, experiment: str = "atr"):
        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        home = Path(home)
        self.home, self.experiment = home, experiment
        self.uri = tracking_uri(home)
        self.offline: str | None = None  # why the server is not used (None: it is)
        self.client, self.experiment_id = None, None
        self._spool: Path | None = None
        if self.uri.startswith(("http://", "https://")):
            self._connect(experiment, home / "mlartifacts")
            return
        if self.uri.startswith("sqlite:"):
            home.mkdir(parents=True, exist_ok=True)
        # A fresh sqlite store is created by alembic migrations on first use; two processes doing
        # that at once (two `atr` commands on a new home) collide, so the first use is serialized.
        lock = open(home / ".mlflow.lock", "w") if self.uri.startswith("sqlite:") else None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            with warnings.catch_warnings():  # SQLAlchemy deprecation noise from MLflow's store
                warnings.simplefilter("ignore", DeprecationWarning)
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment_id(experiment, home / "mlartifacts")
        finally:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
                lock.close()

    # ------------------------------------------------------------- connection, offline mode
    def _connect(self, experiment: str, artifacts: Path) -> None:
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment_id(experiment, artifacts)
        except Exception as exc:  # noqa: BLE001 - sorted below
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        """A call failed: refused credentials raise; an unreachable server turns the tracker offline."""
        if _refused(exc):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingAuthError(
                f"MLflow tracking server {self.uri} refused the credentials "
                f"({'user ' + repr(who) if who else 'none given'}; set MLFLOW_TRACKING_USERNAME and "
                f"MLFLOW_TRACKING_PASSWORD)") from None
        if not _unreachable(exc):
            raise exc
        self.offline = type(exc).__name__ if not isinstance(exc, MlflowException) else "no connection"
        if self.uri not in Tracker._warned:
            Tracker._warned.add(self.uri)
            print(f"atr: warning: MLflow at {self.uri} is unreachable ({self.offline}); recording to DuckDB "
                  f"only, and `atr sync` replays the runs to MLflow later", file=sys.stderr, flush=True)

    def _spool_write(self, op: str, **args) -> None:
        if self._spool is None:
            folder = self.home / SPOOL
            folder.mkdir(parents=True, exist_ok=True)
            self._spool = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
        line = json.dumps({"t": time.time(), "op": op, "experiment": self.experiment, **args}, default=str)
        with open(self._spool, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _call(self, op: str, target: str | None, fn, **args):
        """``fn()`` against the server, or the spool: when offline, when ``target`` (the run the call
        is about) is a stand-in, or when the server stops answering now."""
        if self.offline is None and not (target or "").startswith(OFFLINE_PREFIX):
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - _failed re-raises what is not an outage
                self._failed(exc)
        self._spool_write(op, **args)
        return None

    def _experiment_id(self, name: str, artifacts: Path) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None if self.uri.startswith(_REMOTE_SCHEMES) else artifacts.resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)  # created concurrently
            if found is None:
                raise
            return found.experiment_id

    # ------------------------------------------------------------- the calls
    def start_run(
        self,
        run_name: str,
        params: dict | None = None,
        parent_run_id: str | None = None,
        tags: dict | None = None,
    ) -> str:
        """Create a run (a child run if `parent_run_id`) and return its id (offline: a stand-in id)."""
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        stand_in = OFFLINE_PREFIX + uuid.uuid4().hex

        def create() -> str:
            return self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id

        run_id = self._call("start_run", parent_run_id, create, id=stand_in, run_name=run_name, tags=all_tags)
        run_id = run_id or stand_in
        if params:
            self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Log flattened, stringified params (re-logging an equal value is allowed)."""
        items = {k: _param_value(v) for k, v in flatten(params).items()}

        self._call("log_params", run_id, lambda: _send_params(self.client, run_id, items), run_id=run_id,
                   params=items)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}

        self._call("log_metrics", run_id, lambda: _send_metrics(self.client, run_id, values, timestamp, step or 0),
                   run_id=run_id, metrics=values, step=step or 0, timestamp=timestamp)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a directory's contents, to the run's artifacts (offline: its path is
        spooled; the file must still be there when ``atr sync`` runs)."""
        path = Path(path).resolve()
        self._call("log_artifact", run_id, lambda: _send_artifact(self.client, run_id, path, artifact_path),
                   run_id=run_id, path=str(path), artifact_path=artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in END_STATUSES:
            raise ValueError(f"end_run status must be one of {END_STATUSES}, not {status!r}")
        self._call("end_run", run_id, lambda: self.client.set_terminated(run_id, status=status), run_id=run_id,
                   status=status)


# ---------------------------------------------------------------- atr sync

def pending(home: Path) -> list[Path]:
    """Spool files not yet fully replayed, oldest first."""
    folder = Path(home) / SPOOL
    return sorted(p for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def replay(home: Path, on_ids=None) -> dict[str, int]:
    """Play every pending spool file against the tracking server (``atr sync``).

    Calls are played in the order they were made, across files. Each played call is noted in
    ``<file>.done`` and each stand-in id's real id in ``ids.json`` as soon as it exists, so an
    interrupted replay resumes where it stopped; a fully played file moves to ``done/``.
    ``on_ids(mapping)`` is told the stand-in -> real ids (the caller updates DuckDB). Returns
    counts: files, calls played, runs created."""
    home = Path(home)
    folder = home / SPOOL
    files = pending(home)
    ids_path = folder / "ids.json"
    ids: dict[str, str] = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    played, created = 0, 0
    ops = []
    for f in files:
        done_path = f.with_suffix(".done")
        done = set(json.loads(f"[{','.join(done_path.read_text().split())}]")) if done_path.exists() else set()
        for n, line in enumerate(f.read_text().splitlines()):
            if line.strip() and n not in done:
                ops.append((json.loads(line), f, n))
    ops.sort(key=lambda o: o[0]["t"])
    trackers: dict[str, Tracker] = {}
    for op, f, n in ops:
        exp = op.get("experiment", "atr")
        if exp not in trackers:
            Tracker._warned.add(tracking_uri(home))  # a server still down is this function's one error line
            trackers[exp] = Tracker(home, experiment=exp)
            if trackers[exp].offline:
                raise TrackingError(f"MLflow at {trackers[exp].uri} is still unreachable; nothing replayed after "
                                 f"{played} calls (run `atr sync` again when it answers)")
        t = trackers[exp]

        def real(run_id: str | None) -> str | None:
            if run_id and run_id.startswith(OFFLINE_PREFIX):
                if run_id not in ids:
                    raise TrackingError(f"spool {f.name}: run {run_id} was never started; the spool is damaged")
                return ids[run_id]
            return run_id

        kind = op["op"]
        if kind == "start_run":
            tags = dict(op.get("tags") or {})
            if MLFLOW_PARENT_RUN_ID in tags:
                tags[MLFLOW_PARENT_RUN_ID] = real(tags[MLFLOW_PARENT_RUN_ID])
            if op["id"] not in ids:  # created by an interrupted replay already: keep that run
                tags["atr.synced"] = "true"
                ids[op["id"]] = t.client.create_run(t.experiment_id, run_name=op["run_name"], tags=tags).info.run_id
                created += 1
                _write_json(ids_path, ids)
        elif kind == "log_params":
            _send_params(t.client, real(op["run_id"]), op["params"])
        elif kind == "log_metrics":
            _send_metrics(t.client, real(op["run_id"]), op["metrics"], op["timestamp"], op["step"])
        elif kind == "log_artifact":
            path = Path(op["path"])
            if not path.exists():
                raise TrackingError(f"spool {f.name}: artifact {path} is gone; restore it or delete the spool line")
            _send_artifact(t.client, real(op["run_id"]), path, op.get("artifact_path"))
        elif kind == "end_run":
            t.client.set_terminated(real(op["run_id"]), status=op["status"])
        with open(f.with_suffix(".done"), "a") as d:
            d.write(f"{n}\n")
        played += 1
    if on_ids is not None and ids:
        on_ids(dict(ids))
    for f in files:
        (folder / "done").mkdir(exist_ok=True)
        f.rename(folder / "done" / f.name)
        done_path = f.with_suffix(".done")
        if done_path.exists():
            done_path.rename(folder / "done" / done_path.name)
    return {"files": len(files), "calls": played, "runs": created}


def _send_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    batch = [Param(k, v) for k, v in params.items()]
    for chunk in _chunks(batch, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def _send_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], timestamp: int, step: int) -> None:
    batch = [Metric(k, v, timestamp, step) for k, v in metrics.items()]
    for chunk in _chunks(batch, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def _send_artifact(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """A file, or a directory's contents, to the run's artifacts."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
