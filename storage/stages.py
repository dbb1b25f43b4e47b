"""Content-addressed stage directories with write-then-rename and a manifest.

A stage output lives in ``stages/<stage>/<key>/`` where ``key`` hashes (stage name,
stage code version, config, input hashes). Work happens in ``<key>.tmp/``; the
manifest ``_manifest.json`` is written last, inside the tmp directory, and the
directory is then renamed into place in one ``os.replace``. Hence:

* a directory ``<key>/`` with a parseable manifest is a complete cache hit;
* anything else (``.tmp``, a directory without a manifest) is never a hit;
* a crashed run leaves only ``<key>.tmp/``, which the next run of the same key
  resumes from (stages decide which pieces inside it are complete) and which
  ``atr clean --tmp`` removes.

A per-key ``flock`` keeps two processes from working on the same key at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.config import content_hash
from pipeline.errors import UserError

from .home import Home

MANIFEST = "_manifest.json"


class StageError(UserError, RuntimeError):
    """A stage directory that is not what it should be (one line, names the path)."""


def stage_key(stage: str, version: str, config: Any, inputs: dict[str, str]) -> str:
    """The content hash naming a stage's output directory (and Prefect's cache key)."""
    return content_hash({"stage": stage, "version": version, "config": config, "inputs": inputs})


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    """The manifest of a complete stage directory, or ``StageError``."""
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise StageError(f"{stage_dir}: no {MANIFEST} (not a complete stage output)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise StageError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("complete") is not True:
        raise StageError(f"{path}: manifest is not marked complete")
    return manifest


class StageDir:
    """One stage output: ``stages/<stage>/<key>``."""

    def __init__(self, home: Home, stage: str, key: str):
        self.home, self.stage, self.key = home, stage, key
        self.parent = home.stages / stage
        self.path = self.parent / key
        self.tmp = self.parent / f"{key}.tmp"

    def __repr__(self) -> str:
        return f"StageDir({self.stage}/{self.key})"

    def is_complete(self) -> bool:
        try:
            read_manifest(self.path)
            return True
        except StageError:
            return False

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.path)

    @contextmanager
    def lock(self, timeout: float = 3600.0) -> Iterator[None]:
        """Exclusive per-key lock, so two processes never build the same output at once."""
        self.parent.mkdir(parents=True, exist_ok=True)
        with open(self.parent / f"{self.key}.lock", "w") as fh:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StageError(f"{self.path}: locked by another process for {timeout:.0f}s") from None
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def begin(self, fresh: bool = False) -> Path:
        """Return the work directory, keeping what an interrupted run left there.

        A final directory without a complete manifest (written by something other
        than ``commit``) is moved back to ``.tmp`` so its pieces can be reused.
        ``fresh`` (a forced recompute, ``atr run --from``) empties the work
        directory instead; a complete output stays in place until ``commit``
        replaces it, so a crash during the recompute loses nothing."""
        if fresh:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.path.exists() and not self.is_complete():
            if self.tmp.exists():
                shutil.rmtree(self.path)
            else:
                os.replace(self.path, self.tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Write the manifest last and move the work directory into place."""
        manifest = {
            **manifest,
            "stage": self.stage,
            "key": self.key,
            "complete": True,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(),
        }
        write_json_atomic(self.tmp / MANIFEST, manifest)
        if self.path.exists():  # a complete copy appeared meanwhile (should not happen under the lock)
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return self.path


@dataclass
class StageResult:
    """What a stage returns: its key, its output directory, whether it was a cache hit, how long it
    took (a hit: the lookup) and its manifest. Only these plain values cross task boundaries."""

    stage: str
    key: str
    path: Path
    cached: bool
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path:
        """For prepare-model: where ``from_pretrained`` reads (the stage dir, or the user's dir)."""
        return Path(self.manifest.get("model_dir") or self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "key": self.key, "path": str(self.path), "cached": self.cached,
                "seconds": self.seconds, "manifest": self.manifest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageResult":
        return cls(d["stage"], d["key"], Path(d["path"]), d["cached"], d["seconds"], d["manifest"])


def run_stage(home: Home, stage: str, key: str, build: Callable[[Path], dict[str, Any]], *,
              force: bool = False, fresh: bool | None = None) -> StageResult:
    """The one cache rule of every stage.

    A complete output that is not forced is a cache hit (checked again under the
    per-key lock, so two processes never build one key twice). Otherwise
    ``build(work)`` fills the work directory and returns the manifest, which is
    written last before the rename into place. ``fresh`` (default: ``force``)
    empties the work directory first instead of resuming what an interrupted run
    left there; a complete old output stays until the new one replaces it."""
    t0 = time.perf_counter()
    sd = StageDir(home, stage, key)
    if sd.is_complete() and not force:
        return StageResult(stage, key, sd.path, True, time.perf_counter() - t0, sd.manifest())
    with sd.lock():
        if sd.is_complete() and not force:
            return StageResult(stage, key, sd.path, True, time.perf_counter() - t0, sd.manifest())
        work = sd.begin(fresh=force if fresh is None else fresh)
        path = sd.commit(build(work))
    return StageResult(stage, key, path, False, time.perf_counter() - t0, read_manifest(path))


def stage_result(home: Home, stage: str, ref: str) -> StageResult:
    """A complete stage output as a (cached) StageResult, from a key, a unique key prefix or a path."""
    sd = find_stage(home, stage, ref)
    return StageResult(stage, sd.key, sd.path, True, 0.0, read_manifest(sd.path))


def find_stage(home: Home, stage: str, ref: str) -> StageDir:
    """Resolve a stage reference: a full key, a unique key prefix, or a path to a stage dir."""
    path = Path(ref).expanduser()
    if ref and path.is_dir() and (path / MANIFEST).exists():
        path = path.resolve()
        return StageDir(home, path.parent.name, path.name) if path.parent.parent == home.stages.resolve() \
            else _foreign(home, stage, path)
    if ref and path.is_dir() and not (path / MANIFEST).exists():
        raise StageError(f"{path}: no {MANIFEST} (not a complete stage output; run the command that made it again)")
    parent = home.stages / stage
    # A plain prefix test, not a glob: a ref holding '/', '*' or '[' must not be a pattern.
    matches = sorted(p for p in parent.iterdir() if p.name.startswith(ref) and p.is_dir()
                     and not p.name.endswith(".tmp")) if ref and parent.is_dir() else []
    if len(matches) == 1:
        return StageDir(home, stage, matches[0].name)
    if not matches:
        raise StageError(f"no {stage} stage output matches {ref!r} under {parent}")
    raise StageError(f"{ref!r} matches {len(matches)} {stage} outputs; give more of the hash")


def _foreign(home: Home, stage: str, path: Path) -> StageDir:
    sd = StageDir(home, stage, path.name)
    sd.parent, sd.path, sd.tmp = path.parent, path, path.parent / f"{path.name}.tmp"
    return sd


def clean_tmp(home: Home) -> list[Path]:
    """Remove every ``*.tmp`` stage work directory that no process holds a lock on."""
    removed = []
    if not home.stages.is_dir():
        return removed
    for tmp in sorted(home.stages.glob("*/*.tmp")):
        key = tmp.name[: -len(".tmp")]
        lock_path = tmp.parent / f"{key}.lock"
        with open(lock_path, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run is using it
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
            fcntl.flock(fh, fcntl.LOCK_UN)
    return removed


def code_version() -> str:
    """The installed package version (recorded in manifests)."""
    try:
        from importlib.metadata import version

        return version("atr")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


__all__ = ["StageDir", "StageError", "StageResult", "run_stage", "stage_result", "stage_key", "read_manifest",
           "write_json_atomic", "find_stage", "clean_tmp", "code_version", "MANIFEST"]
