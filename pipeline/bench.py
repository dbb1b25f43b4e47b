"""Timing helpers for ``atr bench``: interleaved rounds, medians, peak tensor memory, machine load.

Pure torch. Every timed call is synchronized on CUDA. Timings interleave the
candidates (A B C A B C ...) after warm-up rounds, so a load change on a shared
machine hits all of them alike, and report medians.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: str | torch.device = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each candidate: ``warmup`` untimed rounds, then ``repeats`` rounds A B C ...

    Returns ``{name: [seconds of round 1, ..., round repeats]}``."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def spread(values: list[float]) -> float:
    """(max - min) / median of a timing list: how noisy the rounds were (0 = identical)."""
    m = median(values)
    return (max(values) - min(values)) / m if m > 0 else 0.0


class _StorageTracker(TorchDispatchMode):
    """Counts the bytes of every tensor storage created inside the mode until it is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key in self._seen or nbytes == 0 or storage.data_ptr() in inputs:
                continue  # already counted, an empty tensor, or an input (in place) or a view of one
            self._seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs (and freed or not by its end); weights and
    other tensors that existed before are not counted.

    CUDA: ``max_memory_allocated`` above the level before the call. CPU (no allocator
    statistics): every tensor storage an op creates is counted until it is freed, through a
    dispatch mode -- slow, so call it outside timed runs. Workspace an op allocates and frees
    internally is not seen on the CPU."""
    if torch.device(device).type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    tracker = _StorageTracker()
    with tracker:
        out = fn()
    peak = tracker.peak
    del out
    return int(peak)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where unavailable."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def _own_jiffies() -> int | None:
    """utime + stime of this process (all its threads) in jiffies."""
    try:
        with open("/proc/self/stat") as fh:
            parts = fh.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LoadReport:
    """Machine load while a benchmark ran. ``other_cores`` is the mean number of CPU cores that
    *other* processes kept busy (0 = the machine was ours); None where /proc is missing."""

    cpus: int
    seconds: float
    other_cores: float | None
    other_cores_max: float | None
    own_cores: float | None
    loadavg_start: float | None
    loadavg_end: float | None
    samples: int
    threshold: float = 0.2
    warnings: list[str] = field(default_factory=list)

    @property
    def trustworthy(self) -> bool:
        return self.other_cores is None or self.other_cores <= self.threshold

    def as_dict(self) -> dict:
        return {"cpus": self.cpus, "seconds": self.seconds, "other_cores_mean": self.other_cores,
                "other_cores_max": self.other_cores_max, "own_cores_mean": self.own_cores,
                "loadavg1_start": self.loadavg_start, "loadavg1_end": self.loadavg_end, "samples": self.samples,
                "threshold_cores": self.threshold, "trustworthy": self.trustworthy}


def _loadavg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return None


class LoadSampler:
    """Samples, every ``interval`` seconds in a background thread, how many cores other processes use.

    Busy jiffies of the whole machine minus this process's own, over wall time. A mean above
    ``threshold`` cores (default 0.2: a tenth of a 2-CPU machine) marks the run untrustworthy:
    the full and pruned runs then competed with others for the cores, unevenly."""

    def __init__(self, interval: float = 0.5, threshold: float = 0.2, label: str = "the benchmark"):
        self.interval, self.threshold, self.label = interval, threshold, label
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: list[tuple[float, float]] = []  # (other cores, own cores) per interval
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _read(self):
        return time.perf_counter(), _cpu_jiffies(), _own_jiffies()

    def _run(self) -> None:
        last = self._read()
        while not self._stop.wait(self.interval):
            now = self._read()
            self._add(last, now)
            last = now
        self._add(last, self._read())

    def _add(self, a, b) -> None:
        (t0, m0, o0), (t1, m1, o1) = a, b
        if m0 is None or m1 is None or o0 is None or o1 is None or t1 - t0 < 0.05 or m1[1] == m0[1]:
            return
        cpus = os.cpu_count() or 1
        busy_frac = (m1[0] - m0[0]) / (m1[1] - m0[1])  # fraction of all CPU time that was busy
        own = (o1 - o0) / self._tick / (t1 - t0)        # cores this process used
        self._samples.append((max(0.0, busy_frac * cpus - own), own))

    def __enter__(self) -> "LoadSampler":
        self._t0, self._load0 = time.perf_counter(), _loadavg()
        self._thread = threading.Thread(target=self._run, name="atr-load-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.report = self._report()

    def _report(self) -> LoadReport:
        other = [s[0] for s in self._samples]
        own = [s[1] for s in self._samples]
        rep = LoadReport(cpus=os.cpu_count() or 1, seconds=time.perf_counter() - self._t0,
                         other_cores=statistics.fmean(other) if other else None,
                         other_cores_max=max(other) if other else None,
                         own_cores=statistics.fmean(own) if own else None,
                         loadavg_start=self._load0, loadavg_end=_loadavg(), samples=len(other),
                         threshold=self.threshold)
        if not rep.trustworthy:
            rep.warnings.append(f"other processes kept {rep.other_cores:.2f} of {rep.cpus} CPU cores busy on "
                                f"average (max {rep.other_cores_max:.2f}) during {self.label}; its timings and their "
                                f"ratios are untrustworthy (threshold {self.threshold:.2f} cores): rerun on a quiet "
                                f"machine")
        return rep


__all__ = ["interleaved", "median", "spread", "peak_memory", "LoadSampler", "LoadReport", "synchronize"]
