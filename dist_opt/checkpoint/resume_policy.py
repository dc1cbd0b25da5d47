"""What a resume does with config keys that differ from the checkpoint's config (one table).

The checkpoint's manifest holds the whole resolved config of the run that saved it. On resume every
key is compared with this run's config and decided by the first matching entry of :data:`POLICY`
(an entry is a dotted key or a section prefix ending in ``.``):

* ``applied``: the new value is used from the resumed step on, and rank 0 prints (and logs) one line
  per change, e.g. ``resume: optimizer.lr 0.003 -> 0.01 (applied: ...)``;
* ``refused``: the resume stops with exit code 2 and one line naming the key, both values and how to
  proceed;
* ``free``: how the run is executed or recorded (world size, micro-batch, output, tracking): changed
  freely and silently (a different world size is a reshard, checked elsewhere).

A new ``train.steps`` / ``train.epochs`` matters only to schedules shaped by the run's length
(:data:`LENGTH_SCHEDULES`); with any other schedule the loop simply runs to the new end.

Every key of the config falls under an entry. Independently of the table, the checkpoint's tensors
are validated against this run's model and optimizer (``dist_opt/checkpoint/state.py``): what does
not fit is refused with one line per mismatched key or shape.

How applied schedule changes work (``optimizer.lr``, ``train.steps``, ``train.epochs``): the lr
schedule is rebuilt from this run's config and advanced to the resumed step (and epoch), so from
step N on the lr is exactly the one a run started with this config would use at step N. A longer
``train.steps`` therefore stretches a decaying schedule over the new length (its lr at step N is
higher than where the old schedule had got to) instead of running past its end. A ``plateau``
schedule depends on the evaluations seen, so it keeps its state and its lr is scaled by the ratio
of the new and the old ``optimizer.lr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["applied", "refused", "free"]

_NEW_RUN = "or start a new run in another run.out_dir"
_SCHEDULE = "from step N on, the lr is what a run started with this config uses at that step"

_QUIETLY_APPLIED = (
    "train.eval_every", "train.eval_max_samples", "train.log_every", "train.max_consecutive_skips",
    "train.preemption_signals",
)  # fmt: skip
_FREE = ("train.", "run.", "data.", "distributed.", "checkpoint.", "tracking.", "deepspeed.")

#: (key or section prefix, verdict, what it means): the first match decides
POLICY: tuple[tuple[str, Verdict, str], ...] = (
    ("optimizer.lr", "applied", f"the schedule is rebuilt from the new base lr; {_SCHEDULE}"),
    ("optimizer.weight_decay", "applied", "the groups that used the old value use the new one"),
    ("optimizer.max_grad_norm", "applied", "clipping uses the new norm"),
    ("train.steps", "applied", f"the schedule is rebuilt for the new length; {_SCHEDULE}"),
    ("train.epochs", "applied", f"the schedule is rebuilt for the new length; {_SCHEDULE}"),
    *((k, "applied", "") for k in _QUIETLY_APPLIED),
    (
        "data.global_batch",
        "applied",
        "the data stream continues at the resumed step but is not the one the saved run would have seen",
    ),
    (
        "run.seed",
        "refused",
        f"it sets the data order and every random stream: keep run.seed={{old}}, {_NEW_RUN}",
    ),
    ("schedule.", "refused", f"the schedule's shape is part of the run: keep {{key}}={{old}}, {_NEW_RUN}"),
    ("optimizer.", "refused", f"the optimizer's state was built with it: keep {{key}}={{old}}, {_NEW_RUN}"),
    ("task.eval_size", "applied", ""),
    ("task.", "refused", f"the task defines the model and the data: keep {{key}}={{old}}, {_NEW_RUN}"),
    ("model.", "applied", ""),
    ("swa.", "applied", "SWA follows the new setting from here on; an average already taken is kept"),
    *((k, "free", "") for k in _FREE),
    ("resume", "free", ""),
)
SCHEDULE_KEYS = frozenset({"optimizer.lr", "train.steps", "train.epochs"})
LENGTH_KEYS = frozenset({"train.steps", "train.epochs"})
#: schedules whose shape depends on the run's length (for the others a new length changes nothing)
LENGTH_SCHEDULES = frozenset({"cosine", "polynomial"})


def verdict(key: str) -> tuple[Verdict, str] | None:
    """The table's decision for dotted ``key`` (None: not in the table; treated as ``free``)."""
    for entry, v, how in POLICY:
        if key == entry or (entry.endswith(".") and key.startswith(entry)):
            return v, how
    return None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Decision:
    applied: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (old, new)
    refused: list[str] = field(default_factory=list)  # one line each
    lines: list[str] = field(default_factory=list)  # what rank 0 prints for the applied changes

    @property
    def reschedule(self) -> bool:
        return bool(SCHEDULE_KEYS & set(self.applied))


def decide(saved: Mapping[str, Any], current: Mapping[str, Any], step: int) -> Decision:
    """Compare the checkpoint's config ``saved`` with this run's ``current`` (both as plain dicts, JSON
    values) key by key; ``step`` is the resumed step (named in the lines)."""
    old, new = flatten(saved), flatten(current)
    d = Decision()
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new or old[key] == new[key]:
            continue  # a key the checkpoint did not record is not compared
        found = verdict(key)
        if key in LENGTH_KEYS and new.get("schedule.name") not in LENGTH_SCHEDULES:
            continue  # the schedule does not depend on the run's length: the loop just runs longer
        if found is None or found[0] == "free":
            continue
        v, how = found
        a, b = old[key], new[key]
        if v == "refused":
            d.refused.append(
                f"{key}: checkpoint has {a!r}, config has {b!r}; cannot change on resume ("
                + how.format(key=key, old=a)
                + ")"
            )
            continue
        d.applied[key] = (a, b)
        detail = f": {how.replace('step N', f'step {step}')}" if how else ""
        d.lines.append(f"resume: {key} {a} -> {b} (applied from step {step}{detail})")
    return d


def config_json(cfg: Any) -> dict[str, Any]:
    """The resolved config as the plain JSON dict a checkpoint's manifest stores."""
    import json

    from dist_opt.config.loader import to_dict

    return json.loads(json.dumps(to_dict(cfg), default=str))


def apply_changes(d: Decision, trainer: Any, fresh_schedule: dict[str, Any]) -> None:
    """Put the applied changes into a trainer that has just loaded its checkpoint. ``fresh_schedule``:
    the schedule's state as this run's config built it, before the checkpoint was loaded."""
    if "optimizer.weight_decay" in d.applied:
        old, new = d.applied["optimizer.weight_decay"]
        for group in trainer.opt.param_groups:
            if group.get("weight_decay") == old:
                group["weight_decay"] = new
    if not d.reschedule:
        return
    sched = trainer.schedule
    loaded = sched.state_dict()
    if loaded["name"] == "plateau":  # its state depends on the evaluations seen: scale it
        old_lr, new_lr = d.applied.get("optimizer.lr", (1.0, 1.0))
        ratio = float(new_lr) / float(old_lr)
        loaded["shadow_lrs"] = [lr * ratio for lr in loaded["shadow_lrs"]]
        if loaded["main"] is not None and "_last_lr" in loaded["main"]:
            loaded["main"]["_last_lr"] = [lr * ratio for lr in loaded["main"]["_last_lr"]]
        sched.load_state_dict(loaded)
        return
    sched.load_state_dict(fresh_schedule)  # this config's schedule, advanced to the resumed position
    for _ in range(int(loaded["steps_done"])):
        sched.step()
    for _ in range(int(loaded["epochs_done"])):
        sched.epoch_end()


def end_notes(step: int, total_steps: int) -> list[str]:
    """What rank 0 says when the resumed checkpoint is already at the run's end."""
    if step < total_steps:
        return []
    return [
        f"the run is complete (step {step} of {total_steps}): nothing to train; raise train.steps to go on"
    ]
