"""`ssh-provisioner ...` (also `jupyter ssh-provisioner ...`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .errors import ProvisionerConfigError, SSHProvisionerError
from .hosts import HostEntry
from .kbdint import KBDINT, parse_rules
from .master import MODES as MASTER_MODES
from .master import USE_CONTROL_MASTER
from .payload import ENTRIES, payload, payload_line
from .slurm import SlurmSettings
from .sshconfig import ALLOW_UNCHECKED

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            if args.from_host:
                return _install_from_host(parser, args)
            if not args.name or not args.hosts:
                parser.error("install needs NAME and --host (or --from-host HOST)")
            return _install(args)
        if args.command == "discover":
            return _discover(args)
        if args.command == "list":
            return _list()
        if args.command == "check":
            return _check(parser, args)
        if args.command == "payload":
            return _payload(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo()
    except KeyboardInterrupt:
        print("interrupted; everything started was removed", file=sys.stderr)
        return 130
    except ProvisionerConfigError as exc:  # a bad argument value
        print(f"ssh-provisioner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SSHProvisionerError as exc:
        print(f"ssh-provisioner {args.command}: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(f"unhandled command {args.command}")


def _payload(args: argparse.Namespace) -> int:
    if args.line:
        sys.stdout.buffer.write(payload_line(args.entry))
        return 0
    from .control import launcher_command

    try:
        print(f"# the command the login shell runs:\n# {launcher_command('PYTHON')}")
        print("# then stdin, line 1: this program (JSON-encoded); line 2: the launch spec\n")
        print(payload(args.entry), end="", flush=True)
    except BrokenPipeError:  # `| head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _install(args: argparse.Namespace) -> int:
    from .kernelspec import build_kernelspec, install_kernelspec

    config: dict[str, Any] = {}
    if args.policy:
        from .policies import load_policy

        load_policy(args.policy)
        config["policy"] = args.policy
    if args.python:
        config["remote_python"] = args.python
    if args.cwd:
        config["remote_cwd"] = args.cwd
    if args.env:
        config["remote_env"] = dict(args.env)
    if args.transport:
        config["remote_transport"] = args.transport
    if args.connect_option:
        config["connect_options"] = dict(args.connect_option)
    if args.kbdint:
        config["kbdint"] = [rule.as_config() for rule in parse_rules(args.kbdint)]
    if args.control_master:
        config["use_control_master"] = args.control_master
    if args.slurm:
        config["slurm"] = _slurm_section(args.slurm)
    spec = build_kernelspec(
        hosts=args.hosts,
        display_name=args.display_name or f"{args.language.capitalize()} ({', '.join(args.hosts)})",
        language=args.language,
        argv=args.kernel_argv or None,
        config=config,
        curve=args.curve,
    )
    if args.check:
        reports = asyncio.run(
            _run_checks(
                [HostEntry.parse(h) for h in args.hosts],
                _doctor_options(config),
                config.get("remote_python", "python3"),
                kernel_argv=args.kernel_argv or None,
                timeout=10.0,
                progress=True,
                slurm=SlurmSettings.parse(config["slurm"]) if args.slurm else None,
            )
        )
        if not any(report.ok for report in reports):
            from .doctor import render_table

            print(render_table(reports), file=sys.stderr)
            print(
                f"ssh-provisioner install: no host works; {args.name!r} not installed",
                file=sys.stderr,
            )
            return 1
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path, replaced = install_kernelspec(args.name, spec, user=args.user, prefix=prefix)
    print(f"{'Replaced' if replaced else 'Installed'} kernelspec {args.name!r} in {path}")
    return 0


def _discover(args: argparse.Namespace) -> int:
    from .discover import render

    kernels = _discovered(args.host, args)
    if args.json:
        print(json.dumps(kernels, indent=1))
    else:
        print(render(args.host, kernels))
    return 0


def _discovered(host: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from .discover import discover_on

    destination = HostEntry.parse(host).host
    options = dict(args.connect_option)
    timeout = float(getattr(args, "timeout", 30.0))
    found = discover_on(destination, options, args.python or "python3", args.search, timeout)
    return asyncio.run(found)


def _install_from_host(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .discover import choose, kernelspec_for, kernelspec_name
    from .kernelspec import install_kernelspec

    host = args.from_host
    chosen = choose(_discovered(host, args), args.kernels)
    if not chosen:
        print(f"ssh-provisioner install: {host} has no kernel to install", file=sys.stderr)
        return 1
    if args.name and len(chosen) > 1:
        parser.error("NAME names one kernel: choose it with --kernel")
    config: dict[str, Any] = {}
    if args.connect_option:
        config["connect_options"] = dict(args.connect_option)
    if args.python:
        config["remote_python"] = args.python
    if args.search:
        config["discover_paths"] = list(args.search)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    for entry in chosen:
        name = args.name or kernelspec_name(entry, host)
        spec = kernelspec_for(entry, host, config)
        path, replaced = install_kernelspec(name, spec, user=args.user, prefix=prefix)
        print(f"{'Replaced' if replaced else 'Installed'} kernelspec {name!r} in {path}")
    return 0


def _list() -> int:
    from .kernelspec import installed_specs

    specs = installed_specs()
    if not specs:
        print("No installed kernelspec uses ssh-provisioner (see: ssh-provisioner install -h).")
        return 0
    width = max(len(spec.name) for spec in specs)
    for spec in specs:
        print(f"{spec.name.ljust(width)}  {spec.policy:<20}  {', '.join(spec.hosts)}")
        print(f"{''.ljust(width)}  {spec.path}")
    return 0


LIST_OPTIONS = ("prologue", "extra_directives")


def _slurm_section(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """--slurm K=V pairs as the config's slurm section (checked: a typo is an error)."""
    section: dict[str, Any] = {}
    for key, text in pairs:
        if key in LIST_OPTIONS:
            section.setdefault(key, []).append(text)
            continue
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        section[key] = value if isinstance(value, (int, float)) else text
    SlurmSettings.parse(section)
    return section


def _doctor_options(config: dict[str, Any]) -> dict[str, Any]:
    """The connect options a kernelspec's config gives the doctor's connections."""
    options = dict(config.get("connect_options", {}))
    if config.get(ALLOW_UNCHECKED):
        options[ALLOW_UNCHECKED] = True
    if config.get("kbdint"):
        options[KBDINT] = list(config["kbdint"])
    if config.get("use_control_master"):
        options[USE_CONTROL_MASTER] = config["use_control_master"]
    return options


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .doctor import render_table

    hosts: list[HostEntry] = [HostEntry.parse(h) for h in args.hosts]
    options: dict[str, Any] = {}
    python = args.python or "python3"
    kernel_argv: list[str] | None = None
    remote_kernel: tuple[str, list[str]] | None = None
    slurm = SlurmSettings.parse(_slurm_section(args.slurm)) if args.slurm else None
    if args.name:
        from .kernelspec import installed_specs

        found = [spec for spec in installed_specs() if spec.name == args.name]
        if not found:
            parser.error(f"no installed ssh-provisioner kernelspec is named {args.name!r}")
        config = found[0].config
        hosts += [HostEntry.parse(item) for item in config.get("hosts", [])]
        options = _doctor_options(config)
        python = args.python or config.get("remote_python", "python3")
        kernel_argv = found[0].argv
        if config.get("remote_kernel"):
            remote_kernel = (str(config["remote_kernel"]), list(config.get("discover_paths", [])))
        if config.get("slurm"):
            slurm = SlurmSettings.parse(config["slurm"])
    if not hosts:
        parser.error("name a kernelspec or give --host")
    options.update(dict(args.connect_option))
    if args.control_master:
        options[USE_CONTROL_MASTER] = args.control_master
    reports = asyncio.run(
        _run_checks(
            hosts,
            options,
            python,
            kernel_argv=kernel_argv,
            timeout=args.timeout,
            progress=not args.json,
            slurm=slurm,
            remote_kernel=remote_kernel,
        )
    )
    if args.json:
        print(json.dumps([report.as_dict() for report in reports], indent=1))
    else:
        print(render_table(reports))
    return 0 if all(report.ok for report in reports) else 1


async def _run_checks(
    hosts: list[HostEntry],
    options: dict[str, Any],
    python: str,
    *,
    kernel_argv: list[str] | None,
    timeout: float,
    progress: bool,
    slurm: SlurmSettings | None = None,
    remote_kernel: tuple[str, list[str]] | None = None,
) -> list[Any]:
    from .doctor import check_host

    if progress:
        print(f"checking {len(hosts)} host(s)...", file=sys.stderr)
    done = 0

    async def one(entry: HostEntry) -> Any:
        nonlocal done
        entry_options = {**options, **entry.override("connect_options", {})}
        if entry.override("kbdint", None):
            entry_options[KBDINT] = list(entry.override("kbdint", []))
        if entry.override("use_control_master", None):
            entry_options[USE_CONTROL_MASTER] = entry.override("use_control_master", "auto")
        report = await check_host(
            entry,
            connect_options=entry_options,
            python=entry.override("remote_python", python),
            kernel_argv=kernel_argv,
            timeout=timeout,
            slurm=slurm,
            remote_kernel=remote_kernel,
        )
        done += 1
        if progress:
            mark = "ok" if report.ok else "PROBLEM"
            print(f"  [{done}/{len(hosts)}] {entry.name}: {mark}", file=sys.stderr)
        return report

    return list(await asyncio.gather(*(one(entry) for entry in hosts)))


if __name__ == "__main__":
    sys.exit(main())
