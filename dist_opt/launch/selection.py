"""Which hosts and slots a launch uses: hostfile, DeepSpeed-style --include/--exclude, --nnodes, --nproc-per-node.

``--include``/``--exclude`` use DeepSpeed's syntax ``NODE[@NODE ...]`` with
``NODE = NAME[:SLOT[,SLOT ...]]`` and the same meaning: include keeps only the named
hosts (all their slots, or the listed ones), exclude drops the listed slots or whole hosts.
Hosts keep their hostfile order, which is also the node rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_opt.launch.errors import LaunchError
from dist_opt.launch.hostfile import Host


@dataclass(frozen=True)
class Node:
    """One node of the launch: its host (None: unnamed, only for --dry-run) and its slot ids."""

    host: str | None
    slots: tuple[int, ...]

    @property
    def nproc(self) -> int:
        return len(self.slots)


def _parse_filter(text: str, hosts: dict[str, int], flag: str) -> dict[str, list[int]]:
    spec: dict[str, list[int]] = {}
    for item in text.split("@"):
        name, colon, slot_text = item.partition(":")
        if not name:
            raise LaunchError(f"{flag} {text!r}: empty host name")
        if name not in hosts:
            raise LaunchError(f"{flag} {text!r}: host {name!r} is not in the hostfile")
        slots = spec.setdefault(name, [])
        if colon:
            for part in slot_text.split(","):
                try:
                    slot = int(part)
                except ValueError:
                    raise LaunchError(f"{flag} {text!r}: slot {part!r} is not an integer") from None
                if not 0 <= slot < hosts[name]:
                    raise LaunchError(
                        f"{flag} {text!r}: host {name!r} has no slot {slot} (slots 0..{hosts[name] - 1})"
                    )
                slots.append(slot)
    return spec


def select_nodes(
    hosts: list[Host],
    include: str = "",
    exclude: str = "",
    nnodes: int | None = None,
    nproc_per_node: int | None = None,
) -> list[Node]:
    """The nodes (in rank order) and slots to launch on."""
    if include and exclude:
        raise LaunchError("--include and --exclude are mutually exclusive")
    if (include or exclude) and (nnodes is not None or nproc_per_node is not None):
        raise LaunchError("--nnodes/--nproc-per-node cannot be combined with --include/--exclude")
    pool = {h.name: h.slots for h in hosts}
    chosen: dict[str, list[int]] = {h.name: list(range(h.slots)) for h in hosts}
    if include:
        spec = _parse_filter(include, pool, "--include")
        chosen = {name: sorted(set(spec[name])) or list(range(pool[name])) for name in pool if name in spec}
    elif exclude:
        spec = _parse_filter(exclude, pool, "--exclude")
        for name, slots in spec.items():
            chosen[name] = [s for s in chosen[name] if slots and s not in slots]
        chosen = {name: slots for name, slots in chosen.items() if slots}
    if not chosen:
        raise LaunchError("no hosts left after --include/--exclude")
    nodes = [Node(host=name, slots=tuple(slots)) for name, slots in chosen.items()]
    if nnodes is not None:
        if nnodes > len(nodes):
            raise LaunchError(f"--nnodes {nnodes}: the hostfile has only {len(nodes)} host(s)")
        nodes = nodes[:nnodes]
    if nproc_per_node is not None:
        nodes = [Node(host=n.host, slots=tuple(range(nproc_per_node))) for n in nodes]
    return nodes


def nodes_without_hostfile(nnodes: int | None, nproc_per_node: int | None, dry_run: bool) -> list[Node]:
    """No hostfile: this machine alone, or (only to print commands) ``nnodes`` unnamed nodes."""
    n = nnodes or 1
    p = nproc_per_node or 1
    if n == 1:
        return [Node(host="localhost", slots=tuple(range(p)))]
    if not dry_run:
        raise LaunchError(f"--nnodes {n} needs --hostfile (or --dry-run to print each node's command)")
    return [Node(host=None, slots=tuple(range(p))) for _ in range(n)]
