"""Tests for content-addressed stage directories (real files, real processes)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from pipeline.config import ExtractConfig
from storage.home import Home
from storage.stages import (
    MANIFEST,
    StageDir,
    StageError,
    clean_tmp,
    find_stage,
    read_manifest,
    stage_key,
    write_json_atomic,
)

KEY = "0123456789abcdef"


@pytest.fixture
def home(tmp_path):
    return Home.resolve(tmp_path / "home").ensure()


def _complete(home: Home, stage: str, key: str, files=("a.txt",)) -> StageDir:
    sd = StageDir(home, stage, key)
    work = sd.begin()
    for name in files:
        (work / name).write_text(name)
    sd.commit({"note": key})
    return sd


# --- stage_key ---------------------------------------------------------------------------------


def test_stage_key_is_deterministic_and_sensitive():
    base = dict(stage="extract", version="1", config={"limit": 4, "crops": "all"}, inputs={"model": "m1", "images": "i1"})
    key = stage_key(**base)
    assert key == stage_key(**base)
    assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)
    variants = [
        {**base, "stage": "select"},
        {**base, "version": "2"},
        {**base, "config": {"limit": 5, "crops": "all"}},
        {**base, "config": {"limit": 4, "crops": "base"}},
        {**base, "config": {"limit": 4, "crops": "all", "seed": 0}},
        {**base, "inputs": {"model": "m2", "images": "i1"}},
        {**base, "inputs": {"model": "m1"}},
    ]
    keys = {stage_key(**v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_stage_key_ignores_dict_order():
    a = stage_key("extract", "1", {"limit": 4, "crops": "all", "nested": {"x": 1, "y": [1, 2]}},
                  {"model": "m", "images": "i"})
    b = stage_key("extract", "1", {"nested": {"y": [1, 2], "x": 1}, "crops": "all", "limit": 4},
                  {"images": "i", "model": "m"})
    assert a == b


def test_stage_key_of_a_config_dataclass_equals_its_dict():
    cfg = ExtractConfig(limit=8)
    assert stage_key("extract", "1", cfg, {}) == stage_key("extract", "1", cfg.to_dict(), {})
    assert stage_key("extract", "1", cfg, {}) != stage_key("extract", "1", ExtractConfig(limit=9), {})


# --- StageDir lifecycle ------------------------------------------------------------------------


def test_lifecycle_begin_commit(home):
    sd = StageDir(home, "extract", KEY)
    assert sd.path == home.stages / "extract" / KEY
    assert sd.tmp == home.stages / "extract" / f"{KEY}.tmp"
    assert not sd.is_complete()

    work = sd.begin()
    assert work == sd.tmp and work.is_dir()
    assert not sd.path.exists() and not sd.is_complete()
    (work / "feats-000000.tar").write_bytes(b"x" * 10)
    (work / "sub").mkdir()
    (work / "sub" / "f").write_text("y")

    out = sd.commit({"counts": {"samples": 3}, "stage": "spoofed", "complete": False})
    assert out == sd.path
    assert not sd.tmp.exists()
    assert sd.is_complete()
    assert (sd.path / "feats-000000.tar").read_bytes() == b"x" * 10
    assert (sd.path / "sub" / "f").read_text() == "y"
    manifest = json.loads((sd.path / MANIFEST).read_text())
    assert manifest["complete"] is True
    assert manifest["stage"] == "extract" and manifest["key"] == KEY
    assert manifest["counts"] == {"samples": 3}
    assert "finished_at" in manifest and "host" in manifest
    assert sd.manifest() == manifest == read_manifest(sd.path)
    assert sorted(p.name for p in sd.parent.iterdir()) == [KEY]  # no .tmp, no manifest .tmp


def test_begin_resumes_an_existing_tmp(home):
    sd = StageDir(home, "extract", KEY)
    (sd.begin() / "piece").write_text("done")
    assert (sd.begin() / "piece").read_text() == "done"


def test_commit_replaces_an_existing_complete_copy(home):
    sd = _complete(home, "extract", KEY, files=("old",))
    (sd.begin() / "new").write_text("new")
    sd.commit({})
    assert (sd.path / "new").exists() and not (sd.path / "old").exists()
    assert not sd.tmp.exists() and sd.is_complete()


INCOMPLETE = {
    "no manifest": None,
    "complete false": json.dumps({"complete": False, "stage": "extract"}).encode(),
    "complete missing": json.dumps({"stage": "extract"}).encode(),
    "complete truthy string": json.dumps({"complete": "yes"}).encode(),
    "corrupt json": b'{"complete": true',
    "not utf-8": b"\xff\xfe\x00{",
    "a list": b"[true]",
    "empty": b"",
}


@pytest.mark.parametrize("case", list(INCOMPLETE))
def test_incomplete_dir_is_never_a_hit_and_begin_reuses_it(home, case):
    sd = StageDir(home, "extract", KEY)
    sd.path.mkdir(parents=True)
    (sd.path / "feats-000000.tar").write_text("piece")
    if INCOMPLETE[case] is not None:
        (sd.path / MANIFEST).write_bytes(INCOMPLETE[case])

    assert not sd.is_complete()
    with pytest.raises(StageError) as info:
        sd.manifest()
    assert str(sd.path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(StageError):
        find_stage(home, "extract", KEY).manifest()

    work = sd.begin()
    assert work == sd.tmp and not sd.path.exists()
    assert (work / "feats-000000.tar").read_text() == "piece"  # pieces kept for reuse


def test_begin_prefers_existing_tmp_over_an_incomplete_final_dir(home):
    sd = StageDir(home, "extract", KEY)
    (sd.begin() / "from-tmp").write_text("1")
    sd.path.mkdir()
    (sd.path / "from-final").write_text("2")
    work = sd.begin()
    assert not sd.path.exists()
    assert sorted(p.name for p in work.iterdir()) == ["from-tmp"]


def test_begin_leaves_a_complete_dir_alone(home):
    sd = _complete(home, "extract", KEY)
    work = sd.begin()
    assert work == sd.tmp and work.is_dir()
    assert sd.is_complete()


def test_fresh_begin_empties_the_work_dir_but_keeps_the_complete_output_until_commit(home):
    sd = _complete(home, "extract", KEY)
    (sd.begin() / "stale-piece").write_text("from an interrupted run")
    work = sd.begin(fresh=True)
    assert list(work.iterdir()) == [] and sd.is_complete()  # the old output still serves readers
    (work / "b.txt").write_text("b")
    sd.commit({"note": "recomputed"})
    assert sd.manifest()["note"] == "recomputed" and sorted(p.name for p in sd.path.iterdir()) == [MANIFEST, "b.txt"]


def test_find_stage_on_a_directory_without_manifest_says_so(home, tmp_path):
    bare = tmp_path / "not-a-stage"
    bare.mkdir()
    with pytest.raises(StageError, match="no _manifest.json"):
        find_stage(home, "extract", str(bare))


def test_read_manifest_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(StageError, match=str(missing)):
        read_manifest(missing)
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(StageError, match=str(d)):
        read_manifest(d)
    (d / MANIFEST).write_text("{oops")
    with pytest.raises(StageError, match=str(d / MANIFEST)):
        read_manifest(d)
    (d / MANIFEST).write_text('{"complete": false}')
    with pytest.raises(StageError, match="not marked complete"):
        read_manifest(d)
    (d / MANIFEST).unlink()
    (d / MANIFEST).mkdir()  # a directory where the manifest should be
    with pytest.raises(StageError, match=str(d)):
        read_manifest(d)


# --- locking across processes ------------------------------------------------------------------


def _waiter(root: str, key: str, trying, result) -> None:
    """Child: a short timeout must fail, then a long one must wait for the holder."""
    sd = StageDir(Home(Path(root)), "extract", key)
    t0 = time.monotonic()
    try:
        with sd.lock(timeout=0.3):
            result.put(("short", "acquired", 0.0, ""))
    except StageError as exc:
        result.put(("short", "timeout", time.monotonic() - t0, str(exc)))
    trying.set()
    with sd.lock(timeout=30):
        result.put(("long", "acquired", time.time(), ""))


def _holder(root: str, key: str, locked, release) -> None:
    sd = StageDir(Home(Path(root)), "extract", key)
    with sd.lock(timeout=5):
        locked.set()
        release.wait(30)


def test_lock_waits_for_the_holder_and_times_out(home):
    ctx = mp.get_context("spawn")
    sd = StageDir(home, "extract", KEY)
    trying, result = ctx.Event(), ctx.Queue()
    with sd.lock(timeout=1):
        child = ctx.Process(target=_waiter, args=(str(home.root), KEY, trying, result))
        child.start()
        try:
            what, outcome, elapsed, msg = result.get(timeout=30)
            assert (what, outcome) == ("short", "timeout")
            assert 0.25 <= elapsed < 5
            assert str(sd.path) in msg
            assert trying.wait(30)
            time.sleep(0.6)  # the child is now polling for the lock
            assert result.empty(), "the child acquired a lock that is held"
            released_at = time.time()
        except BaseException:
            child.kill()
            raise
    what, outcome, acquired_at, _ = result.get(timeout=30)
    child.join(30)
    assert (what, outcome) == ("long", "acquired")
    assert acquired_at >= released_at
    assert acquired_at - released_at < 5
    assert child.exitcode == 0


def test_lock_is_released_on_error(home):
    sd = StageDir(home, "extract", KEY)
    with pytest.raises(RuntimeError):
        with sd.lock(timeout=1):
            raise RuntimeError("boom")
    with sd.lock(timeout=0.5):
        pass


def test_lock_is_per_key_and_short_timeout_in_process(home):
    a, b = StageDir(home, "extract", KEY), StageDir(home, "extract", "f" * 16)
    with a.lock(timeout=1):
        with b.lock(timeout=0.5):  # another key is independent
            pass
        t0 = time.monotonic()
        with pytest.raises(StageError, match=str(a.path)):
            with StageDir(home, "extract", KEY).lock(timeout=0.2):
                pass
        assert time.monotonic() - t0 < 3


def test_clean_tmp_spares_a_locked_tmp(home):
    live, stale = StageDir(home, "extract", KEY), StageDir(home, "select", "e" * 16)
    (live.begin() / "piece").write_text("1")
    (stale.begin() / "piece").write_text("2")
    done = _complete(home, "extract", "d" * 16)

    ctx = mp.get_context("spawn")
    locked, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_holder, args=(str(home.root), KEY, locked, release))
    holder.start()
    try:
        assert locked.wait(30)
        removed = clean_tmp(home)
        assert removed == [stale.tmp]
        assert not stale.tmp.exists()
        assert (live.tmp / "piece").read_text() == "1"
        assert done.is_complete()
    finally:
        release.set()
        holder.join(30)
    assert holder.exitcode == 0
    assert clean_tmp(home) == [live.tmp]
    assert not live.tmp.exists() and done.is_complete()


def test_clean_tmp_without_stages_dir(tmp_path):
    assert clean_tmp(Home(tmp_path / "empty")) == []


# --- find_stage --------------------------------------------------------------------------------


def test_find_stage(home, tmp_path):
    k1, k2, k3 = "abc1230000000000", "abc4560000000000", "fed0000000000000"
    for k in (k1, k2, k3):
        _complete(home, "extract", k)
    StageDir(home, "extract", "abd0000000000000").begin()  # a .tmp is never found
    _complete(home, "select", "abd1111111111111")  # another stage is not searched

    assert find_stage(home, "extract", k1).path == home.stages / "extract" / k1
    found = find_stage(home, "extract", "abc4")
    assert (found.stage, found.key) == ("extract", k2) and found.is_complete()
    assert find_stage(home, "extract", "f").key == k3

    with pytest.raises(StageError, match="matches 2"):
        find_stage(home, "extract", "abc")
    for ref in ("abd", "zzz", "", "*", "abc[1]*", str(tmp_path / "no" / "such")):
        with pytest.raises(StageError):
            find_stage(home, "extract", ref)
    with pytest.raises(StageError, match=str(home.stages / "nostage")):
        find_stage(home, "nostage", "abc")

    # by path: inside the home it is the ordinary stage dir, whatever the stage argument
    by_path = find_stage(home, "extract", str(home.stages / "select" / "abd1111111111111"))
    assert (by_path.stage, by_path.key) == ("select", "abd1111111111111") and by_path.is_complete()
    # a relative or unnormalised path to the same dir resolves the same way
    odd = home.stages / "extract" / ".." / "extract" / k1
    assert find_stage(home, "extract", str(odd)).path == home.stages / "extract" / k1

    # by path outside the home (e.g. a copied stage dir)
    foreign = tmp_path / "elsewhere" / k1
    foreign.parent.mkdir()
    import shutil

    shutil.copytree(home.stages / "extract" / k1, foreign)
    sd = find_stage(home, "extract", str(foreign))
    assert sd.path == foreign and sd.key == k1 and sd.is_complete()
    assert sd.tmp == foreign.parent / f"{k1}.tmp"

    # a path to a dir without a manifest is not a stage
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(StageError):
        find_stage(home, "extract", str(bare))


# --- write_json_atomic -------------------------------------------------------------------------


def test_write_json_atomic(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2], "p": Path("/x")})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1, "p": "/x"}
    write_json_atomic(path, {"c": 3})
    assert json.loads(path.read_text()) == {"c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_write_json_atomic_failure_keeps_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"ok": True})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_json_atomic(path, circular)
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
