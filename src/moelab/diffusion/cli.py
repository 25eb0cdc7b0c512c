"""`moelab diffusion ...` commands. Training commands live in `train_cli`, sampling/evaluation/
analysis/comparison/demo commands in `eval_cli`; each module registers its own subcommands."""

from __future__ import annotations

import argparse


def add_commands(parser: argparse.ArgumentParser) -> None:
    from moelab.diffusion import eval_cli, train_cli

    sub = parser.add_subparsers(dest="command", required=True)
    train_cli.register(sub)
    eval_cli.register(sub)
