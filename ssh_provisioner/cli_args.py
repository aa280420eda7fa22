"""The command line's arguments: every command, option and example (`--help`)."""

from __future__ import annotations

import argparse
import json
from typing import Any, NoReturn

from .master import MODES as MASTER_MODES
from .payload import ENTRIES

EXAMPLES = """examples:
  ssh-provisioner demo                                  a kernel on a throwaway local SSH host
  ssh-provisioner install gpu1-py --host gpu1 --check   a kernelspec for host gpu1
  ssh-provisioner install pool --host gpu1 --host gpu2 --policy most-free-gpu-memory
  ssh-provisioner list                                  kernelspecs that use ssh-provisioner
  ssh-provisioner check gpu1-py                         diagnose the hosts of a kernelspec
  ssh-provisioner check --host alice@gpu3:2222 --json
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, status 2: `prog: error: message (see prog --help)`."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _connect_option(text: str) -> tuple[str, Any]:
    key, value = _key_value(text)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ssh-provisioner",
        description="Run Jupyter kernels on remote hosts over SSH.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    install = commands.add_parser(
        "install",
        help="write a kernelspec whose kernels run on remote hosts",
        description="Write (or replace) a kernelspec that names ssh-provisioner. It shows "
        "up in `jupyter kernelspec list`, JupyterLab and Jupyter Server.",
        epilog="examples:\n"
        "  ssh-provisioner install gpu1-py --host gpu1 --python /opt/conda/bin/python\n"
        "  ssh-provisioner install pool --host gpu1 --host gpu2 --policy least-load --check\n"
        "  ssh-provisioner install shared --host alice@box --transport ipc --env OMP_NUM_THREADS=4"
        "\n"
        "  ssh-provisioner install r-gpu1 --host gpu1 --language R \\\n"
        "      --kernel-argv R --slave -e 'IRkernel::main()' --args '{connection_file}'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install.add_argument(
        "name",
        nargs="?",
        help="kernelspec name (letters, digits, . _ -); with --from-host: "
        "NAME-HOST for each kernel unless one is chosen",
    )
    install.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="H",
        help="SSH destination [user@]host[:port] or ~/.ssh/config alias; repeat",
    )
    install.add_argument(
        "--from-host",
        metavar="H",
        help="install what host H can run (see `discover`): a kernelspec per --kernel, or "
        "every one found",
    )
    install.add_argument(
        "--kernel",
        dest="kernels",
        action="append",
        default=[],
        metavar="NAME",
        help="with --from-host: the host's kernel to install (as `discover` names it); repeat",
    )
    install.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="DIR",
        help="with --from-host: another folder whose subfolders are environments; repeat",
    )
    install.add_argument("--policy", help="host selection policy (default least-kernels)")
    install.add_argument("--python", help="interpreter on the hosts (default python3)")
    install.add_argument("--cwd", help="kernel working directory on the hosts (default: home)")
    install.add_argument(
        "--env",
        action="append",
        type=_key_value,
        default=[],
        metavar="K=V",
        help="environment variable for the kernel; repeat",
    )
    install.add_argument(
        "--transport",
        choices=["tcp", "ipc"],
        help="tcp (default) or ipc (private Unix sockets: shared hosts)",
    )
    install.add_argument(
        "--connect-option",
        action="append",
        type=_connect_option,
        default=[],
        metavar="K=V",
        help="asyncssh.connect option, value as JSON or text; repeat",
    )
    install.add_argument(
        "--kbdint",
        action="append",
        default=[],
        metavar="'REGEX=ANSWER|REGEX=!COMMAND'",
        help="answer a keyboard-interactive prompt (a second factor) matching REGEX with "
        "ANSWER, or with the stdout of COMMAND (a TOTP generator); repeat",
    )
    install.add_argument(
        "--control-master",
        choices=MASTER_MODES,
        help="reuse the user's running OpenSSH master for the hosts (auto: when one runs, "
        "the default; always: never log in ourselves; never)",
    )
    install.add_argument(
        "--slurm",
        action="append",
        type=_key_value,
        default=[],
        metavar="K=V",
        help="run kernels as Slurm jobs through the hosts (login nodes): partition=gpu, "
        "gpus=1, cpus_per_task=4, mem=16G, time=02:00:00, account=..., prologue='module load "
        "cuda' (repeat for more lines), extra_directives=--exclusive, queue_timeout=600, ...",
    )
    install.add_argument(
        "--curve",
        action="store_true",
        help="declare CurveZMQ support (the hosts' kernel must have it: ipykernel >= 7.3 does); "
        "managers with transport_encryption auto or required then encrypt the channels",
    )
    install.add_argument("--display-name", help="name shown in JupyterLab")
    install.add_argument("--language", default="python", help="kernel language (default python)")
    install.add_argument(
        "--kernel-argv",
        nargs=argparse.REMAINDER,
        metavar="ARG",
        help="kernel command on the host (last option; must contain "
        "{connection_file}); default: python3 -m ipykernel_launcher",
    )
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix")
    where.add_argument("--prefix", metavar="DIR", help="install under DIR/share/jupyter")
    install.add_argument(
        "--check",
        action="store_true",
        help="check every host first; refuse to install if none works",
    )

    discover = commands.add_parser(
        "discover",
        help="list the kernels a host can run",
        description="List what a host can run: its Jupyter kernelspecs (every Jupyter data "
        "directory its users would use, and `jupyter kernelspec list` where Jupyter is "
        "installed) and its conda environments and venvs with ipykernel, each with its "
        "language and Python version. Nothing is installed on the host or run from its "
        "environments.",
        epilog="examples:\n"
        "  ssh-provisioner discover gpu1\n"
        "  ssh-provisioner discover gpu1 --search /data/envs --json\n"
        "  ssh-provisioner install --from-host gpu1 --kernel torch --user",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    discover.add_argument("host", help="SSH destination or ~/.ssh/config alias")
    discover.add_argument("--python", default="python3", help="Python on the host (python3)")
    discover.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder whose subfolders are environments; repeat",
    )
    discover.add_argument(
        "--connect-option",
        action="append",
        type=_connect_option,
        default=[],
        metavar="K=V",
        help="asyncssh.connect option, value as JSON or text; repeat",
    )
    discover.add_argument("--timeout", type=float, default=30.0, help="seconds (30)")
    discover.add_argument("--json", action="store_true", help="machine-readable output")

    commands.add_parser(
        "list",
        help="installed kernelspecs that use ssh-provisioner",
        description="List installed kernelspecs that use ssh-provisioner, with hosts and policy.",
        epilog="example:\n  ssh-provisioner list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    check = commands.add_parser(
        "check",
        help="diagnose hosts: DNS, TCP, host key, auth, python, ipykernel, load, GPUs",
        description="Check each host of a kernelspec (or the --host ones) concurrently. "
        "Exit status 0 when every host can run kernels, 1 otherwise.",
        epilog="examples:\n  ssh-provisioner check gpu1-py\n"
        "  ssh-provisioner check --host gpu1 --host alice@gpu2:2222 --python /opt/py/bin/python\n"
        "  ssh-provisioner check gpu1-py --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("name", nargs="?", help="an installed kernelspec")
    check.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        metavar="H",
        help="a destination to check; repeat",
    )
    check.add_argument("--python", help="interpreter to look for (default: the kernelspec's)")
    check.add_argument(
        "--connect-option",
        action="append",
        type=_connect_option,
        default=[],
        metavar="K=V",
        help="asyncssh.connect option; repeat",
    )
    check.add_argument(
        "--control-master",
        choices=MASTER_MODES,
        help="use_control_master for this check (default: the kernelspec's, else auto)",
    )
    check.add_argument(
        "--slurm",
        action="append",
        type=_key_value,
        default=[],
        metavar="K=V",
        help="check the hosts as Slurm login nodes for this job request (partition=gpu ...)",
    )
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per step")
    check.add_argument("--json", action="store_true", help="machine-readable output")

    commands.add_parser(
        "demo",
        help="start a throwaway local sshd host, run a kernel there, print what came back",
        description="Start a private sshd on 127.0.0.1 with generated keys in a temp dir, "
        "run a few cells on a kernel launched through it, print the outputs and timings, "
        "then remove everything (also on Ctrl-C). Touches neither /etc/ssh nor ~/.ssh.",
        epilog="example:\n  ssh-provisioner demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    payload = commands.add_parser(
        "payload",
        help="print the exact program a host runs (for a security review)",
        description="Print what the remote shell runs for a kernel: the command line "
        "(no secret is ever on it) and the payload its stdin's first line carries, "
        "JSON-encoded; the launch spec with the kernel's keys follows as the second line "
        "and is never printed. Nothing is written to the host's disk.",
        epilog="examples:\n  ssh-provisioner payload\n  ssh-provisioner payload --entry reattach"
        "\n  ssh-provisioner payload --line  # the bytes sent, as sent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    payload.add_argument("--entry", choices=sorted(ENTRIES), default="launch")
    payload.add_argument(
        "--line", action="store_true", help="print the stdin line itself (JSON), not its program"
    )
    return parser
