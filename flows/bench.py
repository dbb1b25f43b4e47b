"""``atr bench``: placeholder until the performance work lands (issue 8)."""

from __future__ import annotations


def add_parser(sub, common, model_help: str) -> None:
    sub.add_parser("bench", parents=[common], help="(not yet) speed benchmarks")


def cmd_bench(home, args) -> int:
    raise NotImplementedError("atr bench is not built yet")
