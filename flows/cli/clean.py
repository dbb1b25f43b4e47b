"""``atr clean``: delete the pipeline home, or only its stale ``.tmp`` stage directories."""

from __future__ import annotations

import shutil
import sys

from pipeline.errors import UserError

from .common import add_command


def clean_parser(sub, common) -> None:
    p = add_command(
        sub, common, "clean",
        help="remove the pipeline home (or only stale .tmp work dirs)",
        description="Delete $ATR_HOME entirely, or with --tmp only the unfinished .tmp stage "
                    "directories no running process holds.")
    p.add_argument("--tmp", action="store_true", help="only remove stale .tmp stage directories")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def cmd_clean(home, args) -> int:
    from storage.stages import clean_tmp

    if args.tmp:
        removed = clean_tmp(home)
        print(f"removed {len(removed)} stale .tmp stage directories")
        return 0
    if not home.root.exists():
        print(f"nothing to clean: {home.root} does not exist")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"refusing to delete {home.root} without --yes (no terminal to ask)")
        if input(f"delete {home.root} and everything in it? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    shutil.rmtree(home.root)
    print(f"removed {home.root}")
    return 0
