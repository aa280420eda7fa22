"""What a user may choose when starting a kernel: the kernelspec's ``user_options``,
and the check of a choice against it.

A kernelspec declares each choice with its bounds::

    "user_options": {
      "gpus": {"min": 0, "max": 4, "default": 1},
      "partition": {"choices": ["gpu", "debug"]},
      "time": {"max": "8:00:00", "default": "1:00:00"},
      "host": {}
    }

A choice reaches one kernel three ways, all checked here the same way: JupyterLab's
form (through the server extension), ``start_kernel(user_options={...})``, or
``KERNEL_SSH_<NAME>`` variables in the start request's environment (``KERNEL_SSH_GPUS=2
papermill ...``; ``KERNEL_SSH_HOST`` pins a host with placement's own check).  A value
outside the bounds is refused before anything is submitted or started; restarts keep the
choice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import OptionRefused, ProvisionerConfigError
from .slurm import parse_duration

# What a choice may set: the host, and the Slurm job's resources.
SLURM_CHOOSABLE = ("partition", "gpus", "cpus_per_task", "mem", "time", "account", "qos")
CHOOSABLE = ("host", *SLURM_CHOOSABLE)
KINDS = ("int", "choice", "duration", "memory")
_IMPLIED_KIND = {"gpus": "int", "cpus_per_task": "int", "time": "duration", "mem": "memory"}
LABELS = {"gpus": "GPUs", "cpus_per_task": "CPUs per task", "mem": "Memory", "qos": "QoS"}
LABELS.update(time="Time limit", host="Host", partition="Partition", account="Account")
_MEMORY = re.compile(r"(\d+)([KMGT]?)B?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}  # in MiB, as Slurm's
ENV_PREFIX = "KERNEL_SSH_"


def _measure(kind: str, value: Any) -> float:
    """A value as a number to compare with the bounds (ValueError if it is none)."""
    if kind == "int":
        if isinstance(value, bool) or not re.fullmatch(r"\d+", str(value).strip()):
            raise ValueError("expected a whole number")
        return float(int(str(value).strip()))
    if kind == "duration":
        seconds = parse_duration(str(value))
        if seconds is None:
            raise ValueError("expected a Slurm time: MM, HH:MM:SS or D-HH:MM:SS")
        return seconds
    match = _MEMORY.fullmatch(str(value).strip())
    if not match:
        raise ValueError("expected a size such as 512M or 16G")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


@dataclass(frozen=True)
class Option:
    name: str
    kind: str
    label: str
    default: Any = None
    choices: tuple[str, ...] = ()
    minimum: Any = None
    maximum: Any = None

    def check(self, value: Any) -> Any:
        """``value`` if it is within bounds (as the kind's form), else ValueError."""
        if self.kind == "choice":
            if str(value) not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return str(value)
        number = _measure(self.kind, value)
        low = None if self.minimum is None else _measure(self.kind, self.minimum)
        high = None if self.maximum is None else _measure(self.kind, self.maximum)
        if (low is not None and number < low) or (high is not None and number > high):
            bounds = f"{self.minimum if low is not None else ''}-{self.maximum or ''}"
            raise ValueError(f"{value!r} is outside {bounds}")
        return int(number) if self.kind == "int" else str(value).strip()

    def describe(self) -> dict[str, Any]:
        """For the form: JSON, as the kernelspec declared it, resolved."""
        return {
            "name": self.name,
            "kind": self.kind,
            "label": self.label,
            "default": self.default,
            "choices": list(self.choices),
            "min": self.minimum,
            "max": self.maximum,
        }


@dataclass(frozen=True)
class UserOptions:
    options: tuple[Option, ...] = ()

    @classmethod
    def parse(cls, config: Mapping[str, Any], hosts: Sequence[str] = ()) -> UserOptions:
        """The kernelspec's declaration; a mistake in it is a ProvisionerConfigError."""
        if not isinstance(config, Mapping):
            raise ProvisionerConfigError(f"user_options: expected a dict, not {config!r}")
        options = []
        for name, declared in config.items():
            where = f"user_options {name!r}"
            if name not in CHOOSABLE:
                raise ProvisionerConfigError(f"{where}: may be one of {', '.join(CHOOSABLE)}")
            if not isinstance(declared, Mapping):
                raise ProvisionerConfigError(f"{where}: expected a dict of its bounds")
            unknown = set(declared) - {"kind", "label", "default", "choices", "min", "max"}
            if unknown:
                raise ProvisionerConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
            choices = declared.get("choices") or (list(hosts) if name == "host" else [])
            kind = declared.get("kind") or ("choice" if choices else _IMPLIED_KIND.get(name))
            if kind not in KINDS or (kind == "choice" and not choices):
                raise ProvisionerConfigError(
                    f"{where}: give 'choices', or a kind among {', '.join(KINDS)}"
                )
            option = Option(
                name,
                kind,
                str(declared.get("label") or LABELS[name]),
                # a host left unchosen is the policy's to pick
                declared.get("default", choices[0] if choices and name != "host" else None),
                tuple(str(choice) for choice in choices),
                declared.get("min"),
                declared.get("max"),
            )
            try:
                for bound in (option.minimum, option.maximum):
                    if bound is not None and kind != "choice":
                        _measure(kind, bound)
                if option.default is not None:
                    option.check(option.default)
            except ValueError as exc:
                raise ProvisionerConfigError(f"{where}: its bound or default: {exc}") from None
            options.append(option)
        return cls(tuple(options))

    def resolve(self, chosen: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Every declared option's value: the chosen one (checked) or its default.
        OptionRefused for a value out of bounds or a name not declared."""
        known = {option.name: option for option in self.options}
        undeclared = sorted(set(chosen) - set(known))
        if undeclared:
            allowed = ", ".join(known) or "nothing"
            raise OptionRefused(
                f"{where}: {', '.join(undeclared)} cannot be chosen here (may choose: {allowed})"
            )
        values = {}
        for name, option in known.items():
            value = chosen.get(name, option.default)
            if value is None or value == "":
                continue
            try:
                values[name] = option.check(value)
            except ValueError as exc:
                raise OptionRefused(f"{where}: {option.label} ({name}): {exc}") from None
        return values

    def schema(self) -> list[dict[str, Any]]:
        return [option.describe() for option in self.options]


def from_env(env: Mapping[str, str], declared: UserOptions) -> dict[str, str]:
    """The choices a start request's environment makes (``KERNEL_SSH_GPUS=2``), for
    the declared options.  Not the host: KERNEL_SSH_HOST pins one on its own terms (a
    host's name or address among ``hosts``, any host with ``allow_any_host``)."""
    chosen = {}
    for option in declared.options:
        value = option.name != "host" and env.get(ENV_PREFIX + option.name.upper())
        if value:
            chosen[option.name] = value
    return chosen
