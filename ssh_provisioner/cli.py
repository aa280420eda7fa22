"""`ssh-provisioner ...` (also `jupyter ssh-provisioner ...`): the commands; their
arguments are cli_args.py's."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .cli_args import build_parser
from .errors import ProvisionerConfigError, SSHProvisionerError
from .hosts import HostEntry
from .kbdint import KBDINT, parse_rules
from .master import USE_CONTROL_MASTER
from .payload import payload, payload_line
from .slurm import SlurmSettings
from .sshconfig import ALLOW_UNCHECKED


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
