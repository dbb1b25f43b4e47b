"""The layering contract (flows -> pipeline, storage; pipeline imports neither) holds."""

import shutil
import subprocess
import sys

from conftest import REPO


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(REPO / ".venv" / "bin" / "lint-imports")
    proc = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_pipeline_imports_without_orchestration_libraries():
    code = ("import sys, pipeline.config, pipeline.presets, pipeline.images, pipeline.extract; "
            "bad = [m for m in ('prefect', 'mlflow', 'duckdb', 'storage', 'flows') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
