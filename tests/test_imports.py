"""The layout rules hold: import-linter's contracts (layers, no cycles, who may import what) and
one name per public function."""

import ast
import shutil
import subprocess
import sys
from collections import defaultdict

from conftest import REPO

PACKAGES = ("pipeline", "storage", "flows")


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(REPO / ".venv" / "bin" / "lint-imports")
    proc = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "7 kept, 0 broken" in proc.stdout


def assert_loads_none_of(statement: str, modules: tuple[str, ...]) -> None:
    """``statement`` in a fresh interpreter leaves none of ``modules`` imported."""
    code = (f"import sys; {statement}; bad = [m for m in {modules!r} if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pipeline_imports_without_orchestration_libraries():
    assert_loads_none_of("import pipeline.config, pipeline.presets, pipeline.builders, pipeline.loading, "
                         "pipeline.images, pipeline.extract, pipeline.run_config",
                         ("prefect", "mlflow", "duckdb", "storage", "flows"))


def test_building_the_cli_parser_loads_neither_prefect_nor_torch():
    """The CLI sets PREFECT_HOME and thread counts before either loads."""
    assert_loads_none_of("from flows.cli import build_parser; build_parser()", ("prefect", "torch", "transformers",
                                                                              "mlflow"))


def public_functions() -> dict[str, list[str]]:
    """Module-level public function names -> the modules defining them."""
    names = defaultdict(list)
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                    names[node.name].append(str(path.relative_to(REPO)))
    return names


def test_no_two_public_functions_share_a_name():
    names = public_functions()
    assert len(names) > 150  # the scan sees the code
    shared = {n: where for n, where in names.items() if len(where) > 1}
    assert not shared, shared


def test_nothing_is_called_plain_keep():
    """keep_mask is the (crops, L) bool mask, kept_indices the (crops, k) index tensor."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Name) and node.id in ("keep", "keeps"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} {node.id}")
                elif isinstance(node, ast.arg) and node.arg in ("keep", "keeps"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} argument {node.arg}")
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ("keep", "keeps"):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} def {node.name}")
    assert not bad, bad


def test_the_test_session_set_up_survives_a_second_import_of_conftest():
    """``import tests.conftest`` runs conftest's body a second time under another name: it must
    keep this session's directories (it once pointed the Prefect result path elsewhere)."""
    import importlib.util
    import os

    before = {k: os.environ[k] for k in ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
    spec = importlib.util.spec_from_file_location("_conftest_again", REPO / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert {k: os.environ[k] for k in before} == before
