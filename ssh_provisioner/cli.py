"""`ssh-provisioner ...` (also `jupyter ssh-provisioner ...`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXAMPLES = """examples:
  ssh-provisioner demo          run a kernel on a throwaway local SSH host
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssh-provisioner",
        description="Run Jupyter kernels on remote hosts over SSH.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="start a throwaway local sshd host, run a kernel there, print what came back",
        description="Start a private sshd on 127.0.0.1 with generated keys in a temp dir, "
        "run a few cells on a kernel launched through it, print the outputs and timings, "
        "then remove everything (also on Ctrl-C). Touches neither /etc/ssh nor ~/.ssh.",
        epilog="example:\n  ssh-provisioner demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        try:
            return run_demo()
        except KeyboardInterrupt:
            print("interrupted; everything the demo started was removed", file=sys.stderr)
            return 130
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
