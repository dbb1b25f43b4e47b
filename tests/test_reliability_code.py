"""No code from data: a scan of the source tree, so pickle loading or remote code cannot creep back in.

The scan reads the syntax tree (comments and docstrings do not count) of every
Python file the package ships (pipeline/, storage/, flows/) and refuses:
* importing pickle-family modules (pickle, cPickle, dill, cloudpickle, joblib, shelve, marshal);
* ``torch.load`` without ``weights_only=True``, and ``torch.jit.load`` (a pickle inside);
* ``np.load`` / ``numpy.load`` without ``allow_pickle=False``;
* ``trust_remote_code`` set to anything but ``False`` (keyword or dict key);
* ``eval`` / ``exec`` builtins;
* a Prefect ``@task`` that persists results without ``result_serializer="json"``.

And, through a real flow: a pickle record planted in Prefect's result store under a
stage's cache key is never loaded (Prefect would use the serializer the record names).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("pipeline", "storage", "flows")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value or (
        isinstance(node, ast.Constant) and isinstance(value, str) and node.value == value)


def problems(source: str, name: str = "<src>") -> list[str]:
    """Every unsafe construct in ``source``, as 'name:line: what'."""
    out = []
    tree = ast.parse(source, name)
    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            out.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func)
            if func == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
                out.append(f"{where}: torch.load without weights_only=True")
            if func in ("torch.jit.load", "torch.package.PackageImporter"):
                out.append(f"{where}: {func} unpickles")
            if func in ("np.load", "numpy.load") and not _is_const(_keyword(node, "allow_pickle"), False):
                out.append(f"{where}: {func} without allow_pickle=False")
            if func in ("eval", "exec"):
                out.append(f"{where}: {func}()")
            remote = _keyword(node, "trust_remote_code")
            if remote is not None and not _is_const(remote, False):
                out.append(f"{where}: trust_remote_code enabled")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if _is_const(k, "trust_remote_code") and not _is_const(v, False):
                    out.append(f"{where}: trust_remote_code enabled")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and _dotted(dec.func) in ("task", "prefect.task"):
                    if _is_const(_keyword(dec, "persist_result"), True) and \
                            not _is_const(_keyword(dec, "result_serializer"), "json"):
                        out.append(f"{where}: Prefect task {node.name} persists results without "
                                   "result_serializer='json'")
    return out


def _sources() -> list[Path]:
    files = sorted(f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py"))
    assert len(files) > 20, files  # the scan really covers the package
    return files


def test_the_package_loads_no_code_from_data():
    found = [p for f in _sources() for p in problems(f.read_text(), str(f.relative_to(REPO)))]
    assert found == []


def test_the_scan_covers_the_loaders_in_use():
    """The loaders the package really calls are seen by the scan (so a passing scan means something)."""
    calls = {_dotted(n.func): n for f in _sources() for n in ast.walk(ast.parse(f.read_text()))
             if isinstance(n, ast.Call)}
    assert "np.load" in calls and _is_const(_keyword(calls["np.load"], "allow_pickle"), False)
    assert any(name.endswith("from_pretrained") for name in calls)


@pytest.mark.parametrize("snippet, what", [
    ("import pickle\n", "imports pickle"),
    ("from joblib import load\n", "imports from joblib"),
    ("import torch\ntorch.load(f)\n", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(f, weights_only=False)\n", "torch.load without weights_only=True"),
    ("import torch\ntorch.jit.load(f)\n", "torch.jit.load unpickles"),
    ("import numpy as np\nnp.load(f)\n", "np.load without allow_pickle=False"),
    ("import numpy as np\nnp.load(f, allow_pickle=True)\n", "np.load without allow_pickle=False"),
    ("m.from_pretrained(p, trust_remote_code=True)\n", "trust_remote_code enabled"),
    ("m.from_pretrained(p, trust_remote_code=flag)\n", "trust_remote_code enabled"),
    ("m.from_pretrained(p, **{'trust_remote_code': True})\n", "trust_remote_code enabled"),
    ("eval(text)\n", "eval()"),
    ("from prefect import task\n@task(persist_result=True)\ndef t():\n    pass\n",
     "persists results without result_serializer='json'"),
])
def test_the_scan_catches_each_unsafe_construct(snippet, what):
    found = problems(snippet)
    assert len(found) == 1 and what in found[0], found


def test_safe_forms_pass_the_scan():
    safe = ("import torch, numpy as np\ntorch.load(f, weights_only=True)\nnp.load(f, allow_pickle=False)\n"
            "m.from_pretrained(p, trust_remote_code=False)\n"
            "@task(persist_result=True, result_serializer='json')\ndef t():\n    pass\n")
    assert problems(safe) == []


class _Planted:
    """A pickle payload that creates a file when unpickled (no shell, nothing else)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_cache_record_is_never_unpickled(prefect_api_url, session_home, tmp_path):
    import base64
    import json
    import os
    import pickle

    from flows.orchestration.flows import extract_flow
    from flows.stages.extract import extract_shard, plan_extract
    from flows.stages.prepare_model import prepare_model
    from pipeline.config import ExtractConfig
    from storage.stages import StageDir

    home = session_home
    cfg = ExtractConfig(images="synthetic:docs", limit=4, shard_size=2, batch_size=2,
                        seed=int.from_bytes(os.urandom(4), "big"))  # a cache key no other test uses
    plan = plan_extract(prepare_model(home, "tiny"), cfg)
    StageDir(home, "extract", plan.key).begin()
    extract_shard(home, plan, 0)  # shard 0 done, as an interrupted run leaves it
    marker = tmp_path / "unpickled"
    record = {"metadata": {"storage_key": "x", "expiration": None, "prefect_version": "3",
                           "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None},
                           "storage_block_id": None},
              "result": base64.b64encode(pickle.dumps(_Planted(marker))).decode()}
    store = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    store.mkdir(parents=True, exist_ok=True)
    planted = store / f"{plan.key}-000000"
    planted.write_text(json.dumps(record))
    try:
        extract_flow(str(home.root), "tiny", cfg.to_dict())
    except Exception:  # noqa: BLE001 - what the unpickled object does next does not matter here
        pass
    finally:
        planted.unlink(missing_ok=True)
    assert not marker.exists(), "a pickle from the Prefect result store was loaded"
