"""Tests for the WebDataset feature shards (real tar files, no mocks)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from storage.shards import (
    ShardError,
    encode_json,
    encode_npy,
    iter_features,
    iter_shard,
    manifest_expectations,
    shard_name,
    write_shard,
)

L, C = 4, 8


def _samples(n: int = 3, seed: int = 0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        crops = 1 + (i % 3)  # a different crop count per sample
        feat = rng.standard_normal((crops, L, C)).astype(dtype)
        out.append((f"s{i:09d}", feat, {"image_id": f"img{i}", "crops": crops, "size": [64 + i, 48]}))
    return out


def _craft_tar(path: Path, members: list[tuple[str, bytes]], extra=()) -> Path:
    """A tar with the given regular-file members (and optional TarInfo entries)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
        for ti in extra:
            tar.addfile(ti)
    return path


def _good_pair(key: str = "s1", crops: int = 1, array=None):
    array = np.zeros((crops, L, C), np.float16) if array is None else array
    return [(f"{key}.feat.npy", encode_npy(array)), (f"{key}.json", encode_json({"crops": array.shape[0]}))]


def _refused(path: Path, expect=None, member: str | None = None) -> str:
    with pytest.raises(ShardError) as info:
        list(iter_shard(path, expect))
    msg = str(info.value)
    assert str(path) in msg
    if member is not None:
        assert member in msg
    assert "\n" not in msg
    return msg


# --- round trip and reproducibility -------------------------------------------------------------


def test_round_trip_keys_arrays_meta_in_order(tmp_path):
    samples = _samples(5)
    path = tmp_path / shard_name(0)
    info = write_shard(path, samples)

    data = path.read_bytes()
    assert info == {"name": "feats-000000.tar", "count": 5, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}

    got = list(iter_shard(path, {"dtype": "float16", "tokens_per_crop": L, "feature_dim": C, "crops": "all"}))
    assert [s.key for s in got] == [k for k, _, _ in samples]
    for s, (_, feat, meta) in zip(got, samples):
        assert s.features.dtype == np.float16
        assert s.features.shape == feat.shape
        np.testing.assert_array_equal(s.features, feat)
        assert s.meta == meta

    # the tar layout is what the module docstring promises
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names == [n for k, _, _ in samples for n in (f"{k}.feat.npy", f"{k}.json")]
        assert all(m.isfile() and m.mtime == 0 and m.mode == 0o444 for m in tar.getmembers())


def test_empty_shard_round_trips(tmp_path):
    path = tmp_path / shard_name(1)
    info = write_shard(path, [])
    assert info["count"] == 0
    assert list(iter_shard(path)) == []


def test_same_samples_give_identical_bytes(tmp_path):
    samples = _samples(4)
    a, b = tmp_path / "a" / shard_name(0), tmp_path / "b" / shard_name(0)
    a.parent.mkdir()
    b.parent.mkdir()
    info_a = write_shard(a, samples)
    time.sleep(1.1)  # tar mtimes have 1 s resolution: a wall-clock mtime would now differ
    info_b = write_shard(b, samples)
    assert a.read_bytes() == b.read_bytes()
    assert info_a["sha256"] == info_b["sha256"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_overwrites_atomically_and_leaves_no_tmp(tmp_path):
    path = tmp_path / shard_name(3)
    write_shard(path, _samples(2, seed=1))
    write_shard(path, _samples(3, seed=2))
    assert len(list(iter_shard(path))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("key", ["a.b", "a/b", "..", "../x", "x..y", "", "a\\b"])
def test_write_refuses_bad_keys_and_writes_nothing(tmp_path, key):
    samples = _samples(2) + [(key, np.zeros((1, L, C), np.float16), {"crops": 1})]
    path = tmp_path / shard_name(0)
    with pytest.raises(ShardError) as info:
        write_shard(path, samples)
    assert str(path) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its .tmp


# --- refusals ------------------------------------------------------------------------------------


def test_truncated_shard_is_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, _samples(3))
    data = path.read_bytes()
    half = tmp_path / "half.tar"
    half.write_bytes(data[: len(data) // 2])
    _refused(half)


def test_shard_cut_at_every_block_is_refused(tmp_path):
    """tarfile stops silently at a missing header, so a cut at a member boundary must
    still be caught (it would otherwise read as a valid, shorter shard)."""
    path = tmp_path / shard_name(0)
    write_shard(path, _samples(3))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        end = max(m.offset_data + m.size for m in tar.getmembers())
    cut = tmp_path / "cut.tar"
    for size in range(0, end + 1, 512):
        cut.write_bytes(data[:size])
        _refused(cut)
    # losing only trailing zero padding (after the end-of-archive block) is harmless
    padded_end = -(-end // 512) * 512
    cut.write_bytes(data[: padded_end + 512])
    assert len(list(iter_shard(cut))) == 3


def test_garbage_after_last_member_is_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, _samples(2))
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        end = -(-max(m.offset_data + m.size for m in tar.getmembers()) // 512) * 512
    data[end:end + 512] = b"\x07" * 512  # an invalid header where the end marker was
    path.write_bytes(bytes(data))
    _refused(path)


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth"])
def test_pickle_member_is_refused_and_never_unpickled(tmp_path, ext):
    marker = tmp_path / "pwned"

    class Evil:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (os.mkdir, (str(self.target),))

    # prove the payload is live: unpickling it really has a side effect
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Evil(probe)))
    assert probe.is_dir()

    payload = pickle.dumps(Evil(marker))
    path = _craft_tar(tmp_path / "evil.tar", _good_pair("s1") + [(f"s1.{ext}", payload)])
    _refused(path, member=f"s1.{ext}")
    assert not marker.exists()

    # the same payload disguised as the feature member is not unpickled either
    path = _craft_tar(tmp_path / "evil2.tar", [("s1.feat.npy", payload), ("s1.json", b'{"crops":1}')])
    _refused(path, member="s1.feat.npy")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../evil.json", "/abs/evil.json", "/evil.json", "dir/s1.json", "a/../s1.json"])
def test_unsafe_member_paths_are_refused(tmp_path, name):
    path = _craft_tar(tmp_path / "unsafe.tar", [(name, b'{"crops":1}')] + _good_pair("s1"))
    _refused(path, member=repr(name)[1:-1])


def test_object_dtype_npy_is_refused(tmp_path):
    obj = np.empty((1, L, C), dtype=object)
    obj[...] = 0.5
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    path = _craft_tar(tmp_path / "obj.tar", [("s1.feat.npy", buf.getvalue()), ("s1.json", b'{"crops":1}')])
    _refused(path, member="s1.feat.npy")


def test_npz_and_garbage_in_a_npy_member_are_refused(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((1, L, C), np.float16))
    path = _craft_tar(tmp_path / "npz.tar", [("s1.feat.npy", buf.getvalue()), ("s1.json", b'{"crops":1}')])
    _refused(path, member="s1.feat.npy")
    path = _craft_tar(tmp_path / "junk.tar", [("s1.feat.npy", b"\x93NUMPY garbage"), ("s1.json", b'{"crops":1}')])
    _refused(path, member="s1.feat.npy")


def test_structured_dtype_is_refused(tmp_path):
    arr = np.zeros((1, L, C), dtype=[("a", "<f2")])
    path = _craft_tar(tmp_path / "rec.tar", _good_pair("s1", array=arr))
    _refused(path, member="s1.feat.npy")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused(tmp_path, bad):
    arr = np.ones((2, L, C), np.float16)
    arr[1, 2, 3] = bad
    path = tmp_path / shard_name(0)
    write_shard(path, [("s0", np.ones((1, L, C), np.float16), {"crops": 1}), ("s1", arr, {"crops": 2})])
    msg = _refused(path, member="s1.feat.npy")
    assert "NaN or inf" in msg


def test_dtype_mismatch_is_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [("s1", np.zeros((1, L, C), np.float32), {"crops": 1})])
    assert len(list(iter_shard(path))) == 1  # no expectation, no complaint
    msg = _refused(path, {"dtype": "float16"}, member="s1.feat.npy")
    assert "float32" in msg and "float16" in msg


@pytest.mark.parametrize("expect", [{"tokens_per_crop": L + 1}, {"feature_dim": C - 1}])
def test_shape_mismatch_is_refused(tmp_path, expect):
    path = tmp_path / shard_name(0)
    write_shard(path, [("s1", np.zeros((1, L, C), np.float16), {"crops": 1})])
    msg = _refused(path, expect, member="s1.feat.npy")
    assert next(iter(expect)) in msg


def test_wrong_rank_is_refused(tmp_path):
    path = _craft_tar(tmp_path / "rank.tar", [("s1.feat.npy", encode_npy(np.zeros((L, C), np.float16))),
                                             ("s1.json", b"{}")])
    _refused(path, member="s1.feat.npy")


def test_base_crops_expectation_refuses_two_crops(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [("s1", np.zeros((2, L, C), np.float16), {"crops": 2})])
    assert len(list(iter_shard(path, {"crops": "all"}))) == 1
    msg = _refused(path, {"crops": "base"}, member="s1.feat.npy")
    assert "base" in msg


def test_json_crops_disagreeing_with_array_is_refused(tmp_path):
    path = tmp_path / shard_name(0)
    write_shard(path, [("s1", np.zeros((2, L, C), np.float16), {"crops": 3})])
    _refused(path, member="s1.feat.npy")


def test_bad_json_members_are_refused(tmp_path):
    feat = encode_npy(np.zeros((1, L, C), np.float16))
    for i, body in enumerate([b"{not json", b"\xff\xfe", b"[1, 2]"]):
        path = _craft_tar(tmp_path / f"json{i}.tar", [("s1.feat.npy", feat), ("s1.json", body)])
        _refused(path, member="s1.json")


def test_missing_member_is_refused(tmp_path):
    feat = encode_npy(np.zeros((1, L, C), np.float16))
    # the feature of s1 has no json, and s2 follows
    path = _craft_tar(tmp_path / "gap.tar", [("s1.feat.npy", feat)] + _good_pair("s2"))
    _refused(path, member="s1")
    # the last sample lacks its json
    path = _craft_tar(tmp_path / "tail.tar", _good_pair("s1") + [("s2.feat.npy", feat)])
    _refused(path, member="s2")
    # a json without features
    path = _craft_tar(tmp_path / "nofeat.tar", [("s1.json", b'{"crops":1}')])
    _refused(path, member="s1")


def test_duplicate_members_and_samples_are_refused(tmp_path):
    pair = _good_pair("s1")
    path = _craft_tar(tmp_path / "dup.tar", [pair[0], pair[0], pair[1]])
    _refused(path, member="s1.feat.npy")
    path = _craft_tar(tmp_path / "dup2.tar", pair + _good_pair("s2") + pair)
    _refused(path, member="s1")


def test_member_without_key_or_extension_is_refused(tmp_path):
    for i, name in enumerate([".feat.npy", "README", "s1.txt"]):
        path = _craft_tar(tmp_path / f"odd{i}.tar", _good_pair("s1") + [(name, b"x")])
        _refused(path, member=name)


@pytest.mark.parametrize("kind", ["dir", "symlink", "hardlink", "fifo"])
def test_non_regular_members_are_refused(tmp_path, kind):
    ti = tarfile.TarInfo({"dir": "s2.json", "symlink": "s2.json", "hardlink": "s2.json", "fifo": "s2.json"}[kind])
    ti.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
               "fifo": tarfile.FIFOTYPE}[kind]
    if kind in ("symlink", "hardlink"):
        ti.linkname = "/etc/passwd"
    path = _craft_tar(tmp_path / f"{kind}.tar", _good_pair("s1"), extra=[ti])
    msg = _refused(path, member="s2.json")
    assert "regular file" in msg


def test_missing_file_is_a_shard_error(tmp_path):
    _refused(tmp_path / "nope.tar")


def test_refusal_stops_after_good_samples(tmp_path):
    """Samples before a bad one are yielded; the error comes when the bad one is reached."""
    arr = np.ones((1, L, C), np.float16)
    arr[0, 0, 0] = np.nan
    path = tmp_path / shard_name(0)
    write_shard(path, [("s0", np.ones((1, L, C), np.float16), {"crops": 1}), ("s1", arr, {"crops": 1})])
    it = iter_shard(path)
    assert next(it).key == "s0"
    with pytest.raises(ShardError, match="s1.feat.npy"):
        next(it)


# --- iter_features and manifests -----------------------------------------------------------------


def _stage(tmp_path, n_shards=2, per_shard=3, dtype=np.float16):
    stage = tmp_path / "stage"
    stage.mkdir()
    entries, all_samples = [], []
    for i in range(n_shards):
        samples = [(f"s{i}x{k}", f, m) for k, (_, f, m) in enumerate(_samples(per_shard, seed=i, dtype=dtype))]
        entries.append(write_shard(stage / shard_name(i), samples))
        all_samples += samples
    manifest = {
        "config": {"crops": "all", "images": "synthetic:docs"},
        "features": {"dtype": "float16", "tokens_per_crop": L, "feature_dim": C,
                     "layout": "crops x tokens_per_crop x feature_dim"},
        "shards": entries,
        "complete": True,
    }
    return stage, manifest, all_samples


def test_iter_features_happy_path_over_two_shards(tmp_path):
    stage, manifest, samples = _stage(tmp_path)
    got = list(iter_features(stage, manifest))
    assert [s.key for s in got] == [k for k, _, _ in samples]
    for s, (_, f, m) in zip(got, samples):
        np.testing.assert_array_equal(s.features, f)
        assert s.meta == m


def test_iter_features_missing_shard_is_named(tmp_path):
    stage, manifest, _ = _stage(tmp_path)
    (stage / shard_name(1)).unlink()
    with pytest.raises(ShardError) as info:
        next(iter_features(stage, manifest))
    assert shard_name(1) in str(info.value) and str(stage) in str(info.value)


@pytest.mark.parametrize("manifest", [{}, {"shards": None}, {"shards": "feats-000000.tar"}])
def test_iter_features_without_shards(tmp_path, manifest):
    with pytest.raises(ShardError, match="no shards"):
        list(iter_features(tmp_path, manifest))


@pytest.mark.parametrize("entry", [{"name": "../feats-000000.tar"}, {"name": "/etc/passwd"}, {}, "feats-000000.tar"])
def test_iter_features_refuses_bad_shard_entries(tmp_path, entry):
    stage, manifest, _ = _stage(tmp_path, n_shards=1)
    manifest["shards"] = [entry]
    with pytest.raises(ShardError) as info:
        list(iter_features(stage, manifest))
    assert str(stage) in str(info.value)


def test_iter_features_applies_manifest_expectations(tmp_path):
    stage, manifest, _ = _stage(tmp_path, dtype=np.float32)
    with pytest.raises(ShardError, match="manifest says float16"):
        list(iter_features(stage, manifest))
    manifest["features"]["dtype"] = "float32"
    assert len(list(iter_features(stage, manifest))) == 6
    manifest["config"]["crops"] = "base"  # samples have 1..3 crops
    with pytest.raises(ShardError, match="base only"):
        list(iter_features(stage, manifest))


def test_iter_features_checks_sample_count(tmp_path):
    """A shard replaced by a shorter but valid one disagrees with the manifest's count."""
    stage, manifest, _ = _stage(tmp_path)
    write_shard(stage / shard_name(1), _samples(2, seed=9))
    with pytest.raises(ShardError) as info:
        list(iter_features(stage, manifest))
    assert shard_name(1) in str(info.value) and "3" in str(info.value)


def test_manifest_expectations():
    manifest = {"config": {"crops": "base", "limit": 4},
                "features": {"dtype": "float16", "tokens_per_crop": 576, "feature_dim": 1024, "layout": "x"},
                "shards": []}
    assert manifest_expectations(manifest) == {"dtype": "float16", "tokens_per_crop": 576,
                                               "feature_dim": 1024, "crops": "base"}
    assert manifest_expectations({}) == {}
    assert manifest_expectations({"config": {"images": "x"}}) == {}
    assert manifest_expectations({"features": {"dtype": "float16"}}) == {"dtype": "float16"}


def test_encoders_are_pickle_free():
    with pytest.raises(ValueError):
        encode_npy(np.array([object()], dtype=object))
    assert json.loads(encode_json({"b": 1, "a": [1, 2]})) == {"a": [1, 2], "b": 1}
    assert encode_json({"b": 1, "a": 2}) == b'{"a":2,"b":1}'
