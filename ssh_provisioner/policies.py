"""Host-selection policies: which of the configured hosts gets the next kernel.

A policy only *orders* candidates.  The provisioner has already removed hosts that are
unhealthy, full (``max_kernels``) or excluded by pinning, and it reserves the first
host of the order atomically, so concurrent starts see a consistent view.  Policies
never open connections: a policy that needs facts from the hosts names a
``probe_command``; the provisioner runs it over the pooled connections (cached for
``probe_ttl`` seconds) and the policy reads the output through ``view.probe(entry)``.

Third-party policies register a HostPolicy subclass under the entry-point group
``ssh_provisioner.policies``, or are named by their dotted path ``pkg.module:Class``.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import ClassVar, Protocol

from .errors import ProvisionerConfigError
from .hosts import HostEntry

ENTRY_POINT_GROUP = "ssh_provisioner.policies"


@dataclass(frozen=True)
class Placement:
    """The chosen host, and environment the kernel gets because of the choice."""

    entry: HostEntry
    env: Mapping[str, str] = field(default_factory=dict)


class PlacementView(Protocol):
    """What a policy may read while it ranks (under the placement lock)."""

    def kernels(self, entry: HostEntry) -> int:
        """Kernels this server runs (or is starting) on the host."""
        ...

    def probe(self, entry: HostEntry) -> str | None:
        """Output of the policy's probe_command on the host; None if it failed."""
        ...

    def next_turn(self, entries: Sequence[HostEntry]) -> int:
        """A counter per host list, advanced on every call (for rotations)."""
        ...


class HostPolicy:
    """Base class of host-selection policies.

    Subclasses set ``name`` and implement ``rank``, which returns the candidates in
    order of preference (leaving out any the policy rules out).  ``rank`` runs under
    a lock shared by all starts: it must be quick and must not block.
    """

    name: ClassVar[str] = ""
    probe_command: ClassVar[str | None] = None

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        raise NotImplementedError


class FirstAvailable(HostPolicy):
    """The first healthy host in list order: a primary with fallbacks."""

    name = "first-available"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        return [Placement(entry) for entry in candidates]


class RoundRobin(HostPolicy):
    """Each start takes the next host in list order."""

    name = "round-robin"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        if not candidates:
            return []
        turn = view.next_turn(candidates) % len(candidates)
        ordered = [*candidates[turn:], *candidates[:turn]]
        return [Placement(entry) for entry in ordered]


class RandomChoice(HostPolicy):
    """A host picked at random (then the others, in random order, as fallbacks)."""

    name = "random"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        shuffled = list(candidates)
        random.shuffle(shuffled)
        return [Placement(entry) for entry in shuffled]


class LeastKernels(HostPolicy):
    """The host where this server runs the fewest kernels (list order breaks ties)."""

    name = "least-kernels"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        order = sorted(range(len(candidates)), key=lambda i: (view.kernels(candidates[i]), i))
        return [Placement(candidates[i]) for i in order]


def parse_load(output: str | None) -> float | None:
    """'0.52 0.40 0.33 1/123 4567\\n8\\n' -> 1-minute load per CPU."""
    if not output:
        return None
    try:
        lines = output.split("\n")
        load = float(lines[0].split()[0])
        cpus = int(lines[1].strip())
    except (IndexError, ValueError):
        return None
    return load / cpus if cpus > 0 else None


class LeastLoad(HostPolicy):
    """The host with the lowest 1-minute load average per CPU; unprobed hosts last."""

    name = "least-load"
    probe_command = "cat /proc/loadavg && nproc"

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        loads = [parse_load(view.probe(entry)) for entry in candidates]
        order = sorted(
            range(len(candidates)),
            key=lambda i: (loads[i] is None, loads[i] or 0.0, view.kernels(candidates[i]), i),
        )
        return [Placement(candidates[i]) for i in order]


@dataclass(frozen=True)
class GPU:
    index: int
    free_mib: int
    total_mib: int
    utilization: int


def parse_gpus(output: str | None) -> list[GPU]:
    """nvidia-smi --query-gpu=memory.free,memory.total,utilization.gpu CSV, no header."""
    gpus = []
    for index, line in enumerate((output or "").splitlines()):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            continue
        try:
            free, total = int(float(fields[0])), int(float(fields[1]))
            utilization = int(float(fields[2])) if fields[2] not in ("[N/A]", "N/A") else 0
        except ValueError:
            continue
        gpus.append(GPU(index, free, total, utilization))
    return gpus


class MostFreeGpuMemory(HostPolicy):
    """The host with the GPU that has the most free memory; the kernel gets that GPU
    as CUDA_VISIBLE_DEVICES.  Hosts without a (working) GPU are left out."""

    name = "most-free-gpu-memory"
    probe_command = (
        "nvidia-smi --query-gpu=memory.free,memory.total,utilization.gpu "
        "--format=csv,noheader,nounits"
    )

    def rank(self, candidates: Sequence[HostEntry], view: PlacementView) -> list[Placement]:
        best: list[tuple[GPU, int, HostEntry]] = []
        for position, entry in enumerate(candidates):
            gpus = parse_gpus(view.probe(entry))
            if gpus:
                gpu = max(gpus, key=lambda g: (g.free_mib, -g.utilization, -g.index))
                best.append((gpu, position, entry))
        best.sort(key=lambda item: (-item[0].free_mib, item[0].utilization, item[1]))
        return [
            Placement(entry, {"CUDA_VISIBLE_DEVICES": str(gpu.index)}) for gpu, _, entry in best
        ]


BUILTIN_POLICIES: dict[str, type[HostPolicy]] = {
    policy.name: policy
    for policy in (
        RoundRobin,
        RandomChoice,
        LeastKernels,
        LeastLoad,
        MostFreeGpuMemory,
        FirstAvailable,
    )
}


def available_policies() -> list[str]:
    names = set(BUILTIN_POLICIES)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def load_policy(name: str) -> HostPolicy:
    """A policy by built-in name, entry-point name, or dotted path ``pkg.mod:Class``."""
    cls: object
    if name in BUILTIN_POLICIES:
        cls = BUILTIN_POLICIES[name]
    else:
        found = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
        try:
            if found:
                cls = found[0].load()
            elif ":" in name or "." in name:
                module, _, attribute = name.partition(":") if ":" in name else name.rpartition(".")
                cls = getattr(importlib.import_module(module), attribute)
            else:
                raise LookupError(name)
        except (ImportError, AttributeError, LookupError, ValueError) as exc:
            raise ProvisionerConfigError(
                f"policy {name!r} is unknown ({type(exc).__name__}: {exc}); available: "
                f"{', '.join(available_policies())}, or a dotted path pkg.module:Class"
            ) from exc
    if not (isinstance(cls, type) and issubclass(cls, HostPolicy)):
        raise ProvisionerConfigError(f"policy {name!r} is not a HostPolicy subclass")
    return cls()
