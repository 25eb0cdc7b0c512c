"""`moelab diffusion ...` commands, one module per command family, each registering its own:
`train_cli` (train), `sample_cli` (sample, export), `eval_cli` (evaluate, analyze, compare),
`demo_cli` (demo)."""

from __future__ import annotations

import argparse

from moelab.diffusion import demo_cli, eval_cli, sample_cli, train_cli


def add_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (train_cli, sample_cli, eval_cli, demo_cli):
        family.register(sub)
