"""``atr benchmark``: a synthetic benchmark split as lmms-lab parquet."""

from __future__ import annotations

import shutil
from pathlib import Path

from .common import add_command


def benchmark_parser(sub, common) -> None:
    p = add_command(
        sub, common, "benchmark",
        help="write a synthetic benchmark split as lmms-lab parquet",
        description="Generate synthetic-ocr or synthetic-scene deterministically from a seed and "
                    "write one split as parquet (columns question_id, question, answers, answer, "
                    "image{bytes,path}). Splits are disjoint by content. Cached under "
                    "$ATR_HOME/stages/benchmark/.")
    p.add_argument("name", help="synthetic-ocr or synthetic-scene")
    p.add_argument("--split", default="test", help="train, val or test (default: test)")
    p.add_argument("-n", type=int, default=300, help="number of questions (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.add_argument("--out", default=None, help="also copy the parquet file here")


def cmd_benchmark(home, args) -> int:
    from ..stages.benchmark import synthetic_benchmark

    path = synthetic_benchmark(home, args.name, args.split, args.n, args.seed)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        path = out
    print(f"{args.name} {args.split}: {args.n} questions -> {path}")
    return 0
