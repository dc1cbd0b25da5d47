"""What a checkpoint holds, and how a Trainer's state becomes DCP tensors + JSON and back.

Keys of the tensors DCP writes (every tensor has a world-size independent global shape):

=================================  ========================================================
``model/<param>``                  parameters the optimizer trains (replicated: saved once)
``optim/<param>/<state>``          optimizer state of the *flattened* parameter, global shape
                                   ``(numel,)``: a DTensor ``Shard(0)`` piece per rank when the
                                   state is sharded (ZeRO-1/2; rank r's piece is
                                   ``[r*c, min((r+1)*c, numel))``, ``c = ceil(numel/world)``), the
                                   whole tensor when replicated (ZeRO-0); 0-d step counters as is;
                                   ``optim/<param>/master``: the fp32 master copy of a bf16/fp16
                                   parameter (``model/<param>`` holds its working dtype)
``optim/rule/<block>/<entry>``     rule state outside the per-piece buffers (Shampoo: blocks by
                                   world-size independent name, each written by its owner)
``shared/...``                     tensors inside replicated JSON state (extensions' state_dict)
``rank<r>/...``                    rank r's own state: RNG states, model buffers (e.g. BatchNorm
                                   running statistics, rank-local by design), per-rank extensions
``sharded/...``                    DTensors inside per-rank extension state
=================================  ========================================================

Everything else (step and sample counters, skipped steps, schedule, noise scale, tracking run id,
param-group hyper-parameters, the fp16 loss scale, extension scalars) is JSON in the manifest, see :mod:`.codec`.
Because DCP matches saved chunks to requested ones by global offset, any world size and any
ZeRO stage can load any other's checkpoint.

RNG on a different world size: rank r < saved world size restores rank r's saved generator
states; other ranks get fresh generators seeded from (run.seed, rank, step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from dist_opt.checkpoint import codec
from dist_opt.checkpoint import optim_state as tensors
from dist_opt.checkpoint.errors import CheckpointError
from dist_opt.checkpoint.optim_state import copy_cpu as _copy
from dist_opt.checkpoint.optim_state import shard_piece  # noqa: F401 (extensions import it from here)
from dist_opt.checkpoint.rng import fresh_rng, rng_state, set_rng_state
from dist_opt.optim.registry import structural_keys

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata
    from torch.distributed.device_mesh import DeviceMesh

    from dist_opt.extensions import Extension, TrainerView

MAX_PROBLEMS = 20  # mismatches listed when a checkpoint does not fit


def _copy_dtensor(t: DTensor) -> DTensor:
    return DTensor.from_local(
        _copy(t.to_local()), t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False
    )


def _empty_like_dtensor(t: DTensor) -> DTensor:
    local = t.to_local()
    return DTensor.from_local(
        torch.empty(local.shape, dtype=local.dtype),
        t.device_mesh,
        t.placements,
        shape=t.shape,
        stride=t.stride(),
        run_check=False,
    )


def ext_key(ext: Extension, index: int) -> str:
    return str(getattr(ext, "name", "") or f"extension{index}")


def other_extensions(trainer: TrainerView, me: Any) -> list[tuple[str, Extension]]:
    out: list[tuple[str, Extension]] = []
    names: set[str] = set()
    for i, ext in enumerate(trainer.extensions):
        if ext is me:
            continue
        key = ext_key(ext, i)
        if key in names:
            key = f"{key}{i}"
        names.add(key)
        out.append((key, ext))
    return out


# -- save side ----------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """One rank's copy of everything a checkpoint holds (taken at a step boundary; training may go on)."""

    step: int
    tensors: dict[str, Tensor] = field(default_factory=dict)  # what DCP writes (CPU copies / DTensors)
    shared: dict[str, Any] = field(default_factory=dict)  # JSON, identical on every rank
    union: Any = None  # JSON of the rule state (blocks differ between ranks; merged on rank 0)
    per_rank: dict[str, Any] = field(default_factory=dict)  # JSON of this rank's own state
    ext_checksums: dict[str, int] = field(default_factory=dict)  # replicated extension tensors
    layout: dict[str, Any] = field(default_factory=dict)


def describe(trainer: TrainerView) -> dict[str, Any]:
    """World-size independent description of the model and optimizer (validated on load)."""
    opt = trainer.opt
    o = trainer.cfg.optimizer
    return {
        **tensors.describe_tensors(opt),
        "optimizer": getattr(opt, "name", o.name),
        "zero_stage": getattr(opt, "zero_stage", trainer.cfg.distributed.zero_stage),
        "param_groups": [list(g.get("names", [])) for g in opt.param_groups],
        "optimizer_config": {k: getattr(o, k, None) for k in structural_keys(o.name)},
        "task": trainer.cfg.task.name,
        "global_batch": trainer.cfg.data.global_batch,
        "seed": trainer.cfg.run.seed,
    }


def capture(trainer: TrainerView, me: Any, mesh: DeviceMesh) -> Snapshot:
    """Copy this rank's state (call on every rank at the same step: an extension's state_dict may be a
    collective)."""
    opt = trainer.opt
    rank = trainer.rank
    snap = Snapshot(step=trainer.step, layout=describe(trainer))
    t = snap.tensors
    trained = tensors.trained_names(opt)
    model_sd = trainer.model.state_dict()
    t.update(tensors.capture_tensors(opt, model_sd, mesh))

    def put_shared(key: str, v: Tensor) -> dict[str, Any]:
        if isinstance(v, DTensor):
            t[key] = _copy_dtensor(v)
            return {codec.TENSOR: key, "dtensor": True}
        t[key] = _copy(v)
        if key.startswith("shared/ext/"):
            snap.ext_checksums[key] = codec.checksum(t[key])
        return {codec.TENSOR: key}

    def put_rank(key: str, v: Tensor) -> dict[str, Any]:
        if isinstance(v, DTensor):
            gkey = "sharded/" + key.split("/", 1)[1]
            t[gkey] = _copy_dtensor(v)
            return {codec.TENSOR: gkey, "dtensor": True}
        t[key] = _copy(v)
        return {codec.TENSOR: key}

    def put_union(key: str, v: Tensor) -> dict[str, Any]:
        t[key] = _copy(v)
        return {codec.TENSOR: key}

    exts = other_extensions(trainer, me)
    shared_ext = {k: e.state_dict() for k, e in exts if not getattr(e, "checkpoint_per_rank", False)}
    rank_ext = {k: e.state_dict() for k, e in exts if getattr(e, "checkpoint_per_rank", False)}
    shared = {
        "trainer": trainer.state_dict(),
        "optimizer": {
            "applied_steps": opt.applied_steps,
            "skipped_steps": opt.skipped_steps,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            **_loss_scale(opt),
        },
        "schedule": trainer.schedule.state_dict(),
        "noise": trainer.noise.state_dict() if trainer.noise is not None else None,
        "ext": shared_ext,
    }
    snap.shared = codec.encode(shared, "shared", put_shared)
    snap.union = codec.encode(opt.rule.rule_state_dict(), "optim/rule", put_union)
    buffers = {k: v for k, v in model_sd.items() if k not in trained}
    per_rank = {"rng": rng_state(trainer.device), "buffers": buffers, "ext": rank_ext}
    snap.per_rank = codec.encode(per_rank, f"rank{rank}", put_rank)
    return snap


def _loss_scale(opt: Any) -> dict[str, Any]:
    """The fp16 loss scale's state (``precision.loss_scale``), where the optimizer keeps one."""
    scaler = getattr(opt, "loss_scaler", None)
    return {"loss_scale": scaler.state_dict()} if scaler is not None else {}


def merge(a: Any, b: Any) -> Any:
    """Union of two rule-state skeletons (dicts merged recursively; ``a`` wins on conflicts)."""
    if isinstance(a, dict) and isinstance(b, dict) and codec.TENSOR not in a and codec.TENSOR not in b:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if k in out else v
        return out
    return a


# -- load side ----------------------------------------------------------------------------------
def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


@dataclass
class LoadPlan:
    """Templates DCP fills in, and what to do with them."""

    manifest: dict[str, Any]
    src_rank: int  # whose per-rank state this rank takes
    templates: dict[str, Tensor] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _current_ext_tensors(ext: Extension, prefix: str) -> dict[str, Tensor]:
    found: dict[str, Tensor] = {}

    def put(key: str, v: Tensor) -> dict[str, Any]:
        found[key] = v
        return {codec.TENSOR: key}

    codec.encode(ext.state_dict(), prefix, put)
    return found


def plan_load(trainer: TrainerView, me: Any, manifest: dict[str, Any], md: Metadata) -> LoadPlan:
    """Validate the checkpoint against this Trainer and build the tensors DCP loads into.

    Raises :class:`CheckpointError` listing every mismatch; touches no state of the Trainer."""
    from dist_opt.checkpoint.safe_metadata import tensor_entries

    opt = trainer.opt
    problems: list[str] = []
    saved = manifest["layout"]
    here = describe(trainer)
    rank = trainer.rank
    world = int(manifest["world_size"])
    plan = LoadPlan(manifest=manifest, src_rank=rank if rank < world else 0)
    entries = tensor_entries(md)

    if saved["task"] != here["task"]:
        problems.append(f"task.name: checkpoint has {saved['task']!r}, config has {here['task']!r}")
    for k, b in here["optimizer_config"].items():  # a key the checkpoint did not record is not compared
        a = saved["optimizer_config"].get(k, b)
        if a != b:
            problems.append(f"optimizer.{k}: checkpoint has {a!r}, config has {b!r}")

    def need(key: str, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> bool:
        e = entries.get(key)
        if e is None:
            problems.append(f"{what}: missing from the checkpoint data")
            return False
        if tuple(e.size) != tuple(shape) or e.properties.dtype != dtype:
            problems.append(
                f"{what}: checkpoint has shape {list(e.size)} {_dtype_name(e.properties.dtype)}, "
                f"this run has {list(shape)} {_dtype_name(dtype)}"
            )
            return False
        return True

    model_sd = trainer.model.state_dict()
    plan.templates.update(tensors.plan_tensors(opt, model_sd, saved, here, need, problems, me.mesh))

    # schedule (checked here so that a mismatch is refused before anything is loaded)
    sched_saved = manifest["shared"].get("schedule", {})
    sched_here = trainer.schedule.state_dict()
    for k in ("name", "warmup_steps"):
        if isinstance(sched_saved, dict) and sched_saved.get(k) != sched_here.get(k):
            problems.append(
                f"schedule.{k}: checkpoint has {sched_saved.get(k)!r}, config has {sched_here.get(k)!r}"
            )

    # per-rank model buffers: same names and shapes as this model's
    per_rank = manifest["ranks"][plan.src_rank]
    buf_refs = (
        {k: v for k, v in per_rank.get("buffers", {}).items()}
        if isinstance(per_rank.get("buffers"), dict)
        else {}
    )
    here_bufs = {k: v for k, v in model_sd.items() if k not in tensors.trained_names(opt)}
    if sorted(buf_refs) != sorted(here_bufs):
        a, b = set(buf_refs), set(here_bufs)
        problems.append(
            f"model buffers differ: missing from the checkpoint {sorted(b - a)[:8]}, "
            f"unexpected {sorted(a - b)[:8]}"
        )
    else:
        for name, ref in buf_refs.items():
            v = here_bufs[name]
            if isinstance(ref, dict) and codec.TENSOR in ref:
                need(ref[codec.TENSOR], tuple(v.shape), v.dtype, f"buffer {name}")

    if problems:
        more = len(problems) - MAX_PROBLEMS
        raise CheckpointError(problems[:MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))

    # every other tensor the skeletons reference: full tensors of the saved shape, except DTensors,
    # which take the layout of the current extension's state (resharded on load)
    current: dict[str, Tensor] = {}
    dtensor_exts = {
        r[codec.TENSOR].split("/")[2]
        for r in codec.refs(manifest["shared"].get("ext", {}))
        if r.get("dtensor")
    }
    dtensor_exts |= {
        r[codec.TENSOR].split("/")[2] for r in codec.refs(per_rank.get("ext", {})) if r.get("dtensor")
    }
    for key, ext in other_extensions(trainer, me):
        if key in dtensor_exts:
            pre = "shared" if not getattr(ext, "checkpoint_per_rank", False) else f"rank{rank}"
            for k, v in _current_ext_tensors(ext, f"{pre}/ext/{key}").items():
                current["sharded/" + k.split("/", 1)[1] if pre != "shared" else k] = v
    all_refs = codec.refs(manifest["shared"]) + codec.refs(manifest.get("rule_state")) + codec.refs(per_rank)
    for ref in all_refs:
        key = ref[codec.TENSOR]
        if key in plan.templates:
            continue
        e = entries.get(key)
        if e is None:
            raise CheckpointError([f"tensor {key} is referenced by the manifest but missing from the data"])
        cur = current.get(key)
        if ref.get("dtensor") and isinstance(cur, DTensor) and tuple(cur.shape) == tuple(e.size):
            plan.templates[key] = _empty_like_dtensor(cur)
        else:
            plan.templates[key] = torch.empty(tuple(e.size), dtype=e.properties.dtype)
    return plan


def apply(trainer: TrainerView, me: Any, plan: LoadPlan) -> list[str]:
    """Put the loaded state into the Trainer (after :func:`plan_load` and DCP's load). Returns notes."""
    m = plan.manifest
    opt = trainer.opt
    tm = plan.templates
    notes: list[str] = []

    def get(ref: dict[str, Any]) -> Tensor:
        return tm[ref[codec.TENSOR]]

    shared = codec.decode(m["shared"], get)
    per_rank = codec.decode(m["ranks"][plan.src_rank], get)
    rule_state = codec.decode(m.get("rule_state") or {}, get)
    device = trainer.device
    with torch.no_grad():
        model_sd = trainer.model.state_dict()
        tensors.load_params(opt, model_sd, tm)
        for name, v in per_rank["buffers"].items():
            model_sd[name].copy_(v)
    state, offsets = tensors.loaded_state(opt, tm, device)
    so = shared["optimizer"]
    try:
        opt.load_state_dict(
            {
                "state": state,
                "offsets": offsets,
                "applied_steps": so["applied_steps"],
                "skipped_steps": so["skipped_steps"],
                "param_groups": so["param_groups"],
                "rule_state": rule_state,
                "loss_scale": so.get("loss_scale"),
            }
        )
        trainer.schedule.load_state_dict(shared["schedule"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError([f"optimizer/schedule state does not fit this run: {e}"]) from None
    if trainer.noise is not None and shared.get("noise") is not None:
        trainer.noise.load_state_dict(shared["noise"])
    trainer.load_state_dict(shared["trainer"])
    saved_ext = {**shared.get("ext", {}), **per_rank.get("ext", {})}
    for key, ext in other_extensions(trainer, me):
        if key not in saved_ext:
            notes.append(f"extension {key!r} has no state in the checkpoint; it starts fresh")
            continue
        try:
            ext.load_state_dict(saved_ext[key])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError([f"extension {key!r}: {e}"]) from None
    current = {k for k, _ in other_extensions(trainer, me)}
    for key in saved_ext:
        if key not in current and saved_ext[key]:
            notes.append(f"the checkpoint's {key!r} state is ignored (that feature is off in this run)")
    world = int(m["world_size"])
    if trainer.rank < world:
        set_rng_state(per_rank["rng"], device)
    else:
        fresh_rng(trainer.cfg.run.seed, trainer.rank, trainer.step, device)
        if trainer.rank == world:
            notes.append(
                f"ranks >= {world} (the saved world size) start fresh RNG states seeded from "
                "(run.seed, rank, step)"
            )
    return notes
