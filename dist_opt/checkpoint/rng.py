"""Per-rank random number generator state in a checkpoint (torch, Python, NumPy, CUDA), and fresh
deterministic generators for ranks the checkpoint has no state for (resume on more ranks)."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(st["torch"].to(torch.uint8))
    py = st["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    n = st["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].to(torch.uint8), device)


def fresh_rng(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Deterministic generators for a rank that has no saved state (resume on more ranks)."""
    digest = hashlib.sha256(f"dist-opt/{seed}/{rank}/{step}".encode()).digest()
    h = int.from_bytes(digest[:8], "little") % 2**63
    torch.manual_seed(h)
    random.seed(h)
    np.random.seed(h % 2**32)
    if device.type == "cuda":
        torch.cuda.manual_seed(h)
