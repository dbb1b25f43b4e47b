"""The ATR home directory: where every byte the pipeline writes lives.

Layout (docs/on-disk.md)::

    $ATR_HOME/                    default ./.atr
      stages/<stage>/<hash>/      one content-addressed directory per stage output
      stages/<stage>/<hash>.tmp/  work in progress (ignored by the cache; resumed or cleaned)
      results.duckdb              the SQL results store
      mlflow.db, mlartifacts/     the default MLflow tracking store
      prefect/                    project-local PREFECT_HOME
      reports/                    human-readable reports
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".atr"


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, home: "str | os.PathLike | Home | None" = None) -> "Home":
        """``--home`` wins, then ``$ATR_HOME``, then ``./.atr``; always absolute. A Home is returned as is."""
        if isinstance(home, Home):
            return home
        raw = home if home is not None else os.environ.get("ATR_HOME") or DEFAULT_HOME
        return cls(Path(raw).expanduser().resolve())

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def results_db(self) -> Path:
        return self.root / "results.duckdb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlartifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def ensure(self) -> "Home":
        for path in (self.root, self.stages, self.prefect, self.reports):
            path.mkdir(parents=True, exist_ok=True)
        return self
