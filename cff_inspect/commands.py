"""Subcommands that drive the scorer directly: run (demo), score, train-base."""

from __future__ import annotations

import argparse
import sys


def _pending(sub: argparse._SubParsersAction, name: str, text: str, issue: int) -> None:
    p = sub.add_parser(name, help=f"{text} (not built yet: issue {issue})")

    def run(args: argparse.Namespace) -> int:
        print(f"cff-inspect {name}: not built yet (tracked in issue {issue})", file=sys.stderr)
        return 2

    p.set_defaults(func=run)


def add_run(sub: argparse._SubParsersAction) -> None:
    _pending(sub, "run", "run the whole system on the embedded default", 7)


def add_score(sub: argparse._SubParsersAction) -> None:
    _pending(sub, "score", "score single images with a head", 3)


def add_train_base(sub: argparse._SubParsersAction) -> None:
    _pending(sub, "train-base", "train a base head on auxiliary data with masks", 3)
