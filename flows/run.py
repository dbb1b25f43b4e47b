"""``atr run`` / ``atr serve``: the end-to-end flow (work in progress)."""

from __future__ import annotations


def add_parsers(sub, common) -> None:
    sub.add_parser("run", parents=[common], help="(wip) end-to-end run")
    sub.add_parser("serve", parents=[common], help="(wip) serve on a schedule")


def cmd_run(home, args) -> int:
    raise NotImplementedError


def cmd_serve(home, args) -> int:
    raise NotImplementedError
