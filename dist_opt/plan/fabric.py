"""Interconnect presets and the cost-model settings (``--cost-model FILE``), torch-free.

Bandwidths are per rank and per direction, in GB/s (10^9 bytes/s), at line rate: measured
collective bus bandwidth is usually 70-90 % of it, so the model is optimistic by about that much
unless a file sets lower figures. Latencies are the per-message software + wire cost of one
collective step, rough figures of the right order (NCCL's tuner assumes a few µs per step on
NVLink and InfiniBand); set your own where they matter (small messages, thousands of ranks).

Sources of the presets:

- ``nvlink3``: A100 SXM, NVLink 3 through NVSwitch, 600 GB/s total per GPU = 300 GB/s per
  direction (NVIDIA A100 datasheet).
- ``nvlink4``: H100 SXM, NVLink 4 through NVSwitch, 900 GB/s total per GPU = 450 GB/s per direction
  (NVIDIA H100 datasheet).
- ``pcie4``: PCIe 4.0 x16, 32 GB/s per direction raw (PCI-SIG), GPUs without NVLink.
- ``ib_ndr``: InfiniBand NDR 400 Gb/s = 50 GB/s per NIC (ConnectX-7); DGX H100 has one per GPU.
- ``ib_hdr``: InfiniBand HDR 200 Gb/s = 25 GB/s per NIC (ConnectX-6); DGX A100 has one per GPU.
- ``eth100`` / ``eth25``: 100 / 25 Gb/s Ethernet = 12.5 / 3.125 GB/s, one NIC per node, TCP
  latency of tens of µs.
- ``loopback_gloo``: CPU ranks, gloo over loopback on one host. Measured here (2 ranks on a
  2-core AMD EPYC VM, other jobs running): all-reduce of 4-32 MiB fp32 at about 1.1 GB/s, 1 KiB in
  about 0.2 ms. ``python -m bench.scaling --validate`` measures it again on your machine.

A cost-model file (YAML) may set any of these keys::

    gpus_per_node: 8          # ranks per node (int >= 1)
    intra: nvlink4            # a preset name, or {preset: NAME, bandwidth_GBps: X, latency_us: Y}
    inter: {preset: ib_ndr, nics_per_node: 8}   # nics_per_node: default one per rank for InfiniBand
    algorithm: auto           # ring | tree | auto (the cheaper per collective)
    overlap: 0.0              # share of the gradient collective hidden behind backward, 0..1
    grad_bytes: 2             # bytes per gradient element reduced (default: the run's precision.reduce)
    param_bytes: 2            # bytes per parameter all-gathered (default: the run's precision.params)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dist_opt.plan.collectives import ALGORITHMS, Link


@dataclass(frozen=True)
class Fabric:
    """One kind of link: per-NIC/per-GPU ``bandwidth_GBps`` (one direction), ``latency_us``;
    ``nics_per_node`` (inter-node fabrics; None = one per rank, rail-optimised clusters)."""

    bandwidth_GBps: float
    latency_us: float
    nics_per_node: int | None = None


PRESETS: dict[str, Fabric] = {
    "nvlink3": Fabric(300.0, 3.0),
    "nvlink4": Fabric(450.0, 3.0),
    "pcie4": Fabric(32.0, 5.0),
    "ib_ndr": Fabric(50.0, 5.0),
    "ib_hdr": Fabric(25.0, 5.0),
    "eth100": Fabric(12.5, 30.0, nics_per_node=1),
    "eth25": Fabric(3.125, 50.0, nics_per_node=1),
    "loopback_gloo": Fabric(1.1, 100.0),
}


class CostModelError(ValueError):
    """A bad cost-model setting; the message is one line naming the key (and the file)."""


@dataclass(frozen=True)
class CostModel:
    """Everything the step-time model needs besides the workload."""

    gpus_per_node: int = 8
    intra: Fabric = PRESETS["nvlink4"]
    inter: Fabric = PRESETS["ib_ndr"]
    intra_name: str = "nvlink4"
    inter_name: str = "ib_ndr"
    algorithm: str = "auto"
    overlap: float = 0.0
    grad_bytes: float | None = None
    param_bytes: float | None = None

    def intra_link(self) -> Link:
        return Link(self.intra.latency_us * 1e-6, self.intra.bandwidth_GBps * 1e9)

    def inter_link(self, ranks_per_node: int) -> Link:
        """The inter-node link one rank sees while all ``ranks_per_node`` local ranks send at once."""
        nics = self.inter.nics_per_node or ranks_per_node
        per_rank = self.inter.bandwidth_GBps * 1e9 * nics / ranks_per_node
        return Link(self.inter.latency_us * 1e-6, per_rank)

    def describe(self) -> str:
        return (
            f"{self.gpus_per_node} GPUs/node, intra {self.intra_name} {self.intra.bandwidth_GBps:g} GB/s "
            f"{self.intra.latency_us:g} µs, inter {self.inter_name} {self.inter.bandwidth_GBps:g} GB/s "
            f"x{self.inter.nics_per_node or self.gpus_per_node} NICs/node {self.inter.latency_us:g} µs, "
            f"{self.algorithm}, overlap {self.overlap:g}"
        )


KEYS = ("gpus_per_node", "intra", "inter", "algorithm", "overlap", "grad_bytes", "param_bytes")
FABRIC_KEYS = ("preset", "bandwidth_GBps", "latency_us", "nics_per_node")


def _positive(key: str, v: Any, integer: bool = False) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if ok and integer and not (isinstance(v, int) or float(v).is_integer()):
        ok = False
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise CostModelError(f"key {key!r}: expected {kind}, got {v!r}")
    return int(v) if integer else float(v)


def _fabric(key: str, v: Any) -> tuple[str, Fabric]:
    if isinstance(v, str):
        v = {"preset": v}
    if not isinstance(v, dict):
        raise CostModelError(f"key {key!r}: expected a preset name or a mapping, got {v!r}")
    for k in v:
        if k not in FABRIC_KEYS:
            raise CostModelError(f"unknown key '{key}.{k}' (expected one of {', '.join(FABRIC_KEYS)})")
    name = v.get("preset", "custom")
    if name not in PRESETS and name != "custom":
        raise CostModelError(f"key '{key}.preset': unknown fabric {name!r} (one of {', '.join(PRESETS)})")
    if name == "custom" and not {"bandwidth_GBps", "latency_us"} <= set(v):
        raise CostModelError(f"key {key!r}: without a preset set both bandwidth_GBps and latency_us")
    fab = PRESETS.get(name, Fabric(1.0, 1.0))
    if "bandwidth_GBps" in v:
        fab = replace(fab, bandwidth_GBps=_positive(f"{key}.bandwidth_GBps", v["bandwidth_GBps"]))
    if "latency_us" in v:
        lat = v["latency_us"]
        if not (
            isinstance(lat, int | float) and not isinstance(lat, bool) and math.isfinite(lat) and lat >= 0
        ):
            raise CostModelError(f"key '{key}.latency_us': expected a number >= 0, got {lat!r}")
        fab = replace(fab, latency_us=float(lat))
    if "nics_per_node" in v:
        fab = replace(fab, nics_per_node=int(_positive(f"{key}.nics_per_node", v["nics_per_node"], True)))
    return name, fab


def cost_model_from_dict(data: Any, base: CostModel | None = None) -> CostModel:
    """A :class:`CostModel` from a mapping of the keys above; :class:`CostModelError` on the first bad one."""
    cm = base or CostModel()
    if data is None:
        return cm
    if not isinstance(data, dict):
        raise CostModelError(f"expected a mapping of {', '.join(KEYS)}, got {type(data).__name__}")
    for key, v in data.items():
        if key not in KEYS:
            raise CostModelError(f"unknown key {key!r} (expected one of {', '.join(KEYS)})")
        if key == "gpus_per_node":
            cm = replace(cm, gpus_per_node=int(_positive(key, v, integer=True)))
        elif key in ("intra", "inter"):
            name, fab = _fabric(key, v)
            if key == "intra":
                cm = replace(cm, intra=fab, intra_name=name)
            else:
                cm = replace(cm, inter=fab, inter_name=name)
        elif key == "algorithm":
            if v not in ALGORITHMS:
                raise CostModelError(f"key 'algorithm': expected one of {', '.join(ALGORITHMS)}, got {v!r}")
            cm = replace(cm, algorithm=v)
        elif key == "overlap":
            if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1):
                raise CostModelError(f"key 'overlap': expected a number in [0, 1], got {v!r}")
            cm = replace(cm, overlap=float(v))
        elif key == "grad_bytes":
            cm = replace(cm, grad_bytes=_positive(key, v))
        else:
            cm = replace(cm, param_bytes=_positive(key, v))
    return cm


def load_cost_model(path: str | Path, base: CostModel | None = None) -> CostModel:
    """Read a YAML cost-model file; any problem -> :class:`CostModelError` naming the file."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise CostModelError(f"{p}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise CostModelError(f"{p}:{where} not valid YAML") from None
    try:
        return cost_model_from_dict(data, base)
    except CostModelError as e:
        raise CostModelError(f"{p}: {e}") from None
