"""`moelab seismic ...` commands (placeholder until the seismic harness fills it in)."""

import argparse


def add_commands(parser: argparse.ArgumentParser) -> None:
    parser.add_subparsers(dest="command", required=True)
