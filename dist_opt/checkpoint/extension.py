"""The checkpoint Trainer extension: when to save, async saving, resume at setup, test-only kill points.

Saves (``<run.out_dir>/checkpoints/step-N/``, see :mod:`.store` and :mod:`.state`):

* ``checkpoint.every_steps = k``: after every k-th step, at the end of that step's boundary work
  (epoch end, evaluation, lr-schedule updates: the Trainer calls :meth:`step_end` last), so the
  resumed run continues exactly where the saved one was;
* ``checkpoint.every_epochs = k``: at the end of every k-th epoch (same point);
* ``checkpoint.at_end``: after the last step and the final evaluation;
* always when the run stops early, from ``on_stop``: the ranks agreed to stop (preemption signal), or
  too many consecutive non-finite steps (the checkpoint then holds the last applied step's weights).

``checkpoint.async``: the state is copied to CPU memory at the step boundary (the only part that
blocks training) and written by a background thread over a dedicated gloo group, so training
continues; one save is in flight at a time; the completion marker is written after every rank
finished writing. ``checkpoint.keep``: the newest k complete checkpoints are kept.

Resume (``resume`` = ``latest`` | a step folder | a run or checkpoints folder): rank 0 picks the
checkpoint (``latest`` skips incomplete or corrupt folders and says which and why; see
:mod:`.resume`) and verifies every file's size and CRC-32; every rank then validates it against its
model and optimizer (mismatches are refused with one line each, exit code 2) and loads its part with
DCP -- at any world size.

Test-only fault hooks (read from the environment by tests/test_checkpoint.py, never set in normal
runs): ``DIST_OPT_TEST_KILL_AT_STEP=RANK:STEP[:ATTEMPT]`` SIGKILLs that rank right after step STEP;
``DIST_OPT_TEST_KILL_IN_SAVE=RANK:STEP[:ATTEMPT]`` SIGKILLs it during the save of step STEP, after
its data files are written and before the completion marker. Either fires only in the given
torchrun attempt (``TORCHELASTIC_RESTART_COUNT``, default 0), so the restarted group gets past it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dist_opt.checkpoint import store
from dist_opt.checkpoint.errors import CheckpointError, agree, data_problem, load_failures
from dist_opt.checkpoint.resume import resolve_agreed
from dist_opt.config import Config, ConfigError
from dist_opt.extensions import Extension

if TYPE_CHECKING:
    from dist_opt.checkpoint import state as st
    from dist_opt.extensions import TrainerView

ENV_KILL_AT_STEP = "DIST_OPT_TEST_KILL_AT_STEP"
ENV_KILL_IN_SAVE = "DIST_OPT_TEST_KILL_IN_SAVE"


def _parse_kill(env: Mapping[str, str], var: str) -> tuple[int, int] | None:
    """(rank, step) of a test-only kill hook if it applies to this torchrun attempt."""
    text = env.get(var, "")
    if not text:
        return None
    try:
        parts = [int(x) for x in text.split(":")]
        if len(parts) not in (2, 3):
            raise ValueError
    except ValueError:
        raise ConfigError([f"{var}={text!r}: expected RANK:STEP[:ATTEMPT]"]) from None
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if (parts[2] if len(parts) == 3 else 0) != attempt:
        return None
    return parts[0], parts[1]


def _kill_self(what: str) -> None:
    print(f"dist-opt: test hook: {what}: SIGKILL", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class CheckpointExtension(Extension):
    """Sharded, atomic, reshardable checkpoints with exact resume (see the module docstring)."""

    name = "checkpoint"

    def __init__(self, cfg: Config, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.cfg = cfg
        self.root = store.checkpoints_dir(cfg.run.out_dir)
        self.group: Any = None
        self.mesh: Any = None
        self.rank, self.world = 0, 1
        self._due: str | None = None
        self._last_step: int | None = None  # step of the checkpoint this run saved or resumed from
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # per save (for benchmarks): step, capture_s (CPU copy), write_s (DCP), hash_s, bytes (this rank's
        # data files), blocking_s (time the training loop waited), total_s (until the marker)
        self.saves: list[dict[str, float]] = []
        self.loaded_from: Path | None = None
        # the last load: plan_s (validate), read_s (DCP), apply_s, bytes (what this rank read)
        self.last_load: dict[str, float] = {}
        self._kill_at = _parse_kill(env, ENV_KILL_AT_STEP)
        self._kill_in_save = _parse_kill(env, ENV_KILL_IN_SAVE)

    # -- hooks -----------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """False when this run neither saves nor resumes (then nothing is set up or imported)."""
        c = self.cfg.checkpoint
        return bool(c.every_steps or c.every_epochs or c.at_end or self.cfg.resume.strip().lower() != "none")

    def setup(self, trainer: TrainerView) -> None:
        self.rank, self.world = trainer.rank, trainer.world
        if not self.active:
            return
        from torch.distributed.device_mesh import DeviceMesh

        # checkpoint I/O has its own gloo group (CPU copies whatever the training backend; async saves never
        # interleave with the loop's collectives), with the run's timeout: not gloo's 30 min for a stalled peer
        timeout = timedelta(seconds=self.cfg.distributed.timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.mesh = DeviceMesh.from_group(self.group, "cpu")
        folder = resolve_agreed(self.cfg, self.root, self.rank, self.group, report=_say)
        if folder is None:
            return
        self.load(trainer, folder)

    def after_step(self, trainer: TrainerView, metrics: dict[str, Any]) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and trainer.step % every == 0:
            self._due = "every_steps"
        if self._kill_at is not None and self._kill_at == (self.rank, trainer.step):
            _kill_self(f"{ENV_KILL_AT_STEP}: rank {self.rank} after step {trainer.step}")

    def after_epoch(self, trainer: TrainerView, epoch: int) -> None:
        every = self.cfg.checkpoint.every_epochs
        if every and (epoch + 1) % every == 0:
            self._due = "every_epochs"

    def step_end(self, trainer: TrainerView) -> None:
        """Called by the Trainer after all of a step's boundary work (the exact-resume point)."""
        due, self._due = self._due, None
        if due is None:
            return
        if trainer.step >= trainer.total_steps and self.cfg.checkpoint.at_end:
            return  # ``finish`` saves this step after the final evaluation
        self.save(trainer, due)

    def on_stop(self, trainer: TrainerView, reason: str) -> None:
        """The run stops early: an agreed stop (preemption) or a non-finite storm (whose skipped steps
        left the parameters of the last applied step): save where it stopped."""
        if self.group is not None:
            self.save(trainer, "stop")
        self.wait()

    def finish(self, trainer: TrainerView) -> None:
        if self.cfg.checkpoint.at_end and self.group is not None:
            self.save(trainer, "end")
        self.wait()

    def state_dict(self) -> dict[str, Any]:
        return {}

    # -- save ------------------------------------------------------------------------------------
    def save(self, trainer: TrainerView, reason: str) -> Path | None:
        """Save the state after ``trainer.step`` (collective). Returns the folder (being written if async)."""
        step = trainer.step
        if step == self._last_step:
            return None  # this exact state is already a checkpoint (saved, or resumed from)
        self.wait()
        from dist_opt.checkpoint import state as st

        t0 = time.perf_counter()
        snap = st.capture(trainer, self, self.mesh)
        folder = store.step_dir(self.root, step)
        record = {
            "step": float(step),
            "capture_s": time.perf_counter() - t0,
            "blocking_s": 0.0,
            "total_s": 0.0,
        }
        self.saves.append(record)
        self._last_step = step
        job = self._writer(snap, folder, reason, t0, record)
        if self.cfg.checkpoint.async_save:
            self._error = None
            self._thread = threading.Thread(
                target=self._run_job, args=(job,), name="dist-opt-checkpoint", daemon=True
            )
            self._thread.start()
        else:
            job()
        record["blocking_s"] = time.perf_counter() - t0
        return folder

    def _run_job(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _writer(
        self, snap: st.Snapshot, folder: Path, reason: str, t0: float, record: dict[str, float]
    ) -> Callable[[], None]:
        rank, world, group = self.rank, self.world, self.group

        def job() -> None:
            import torch.distributed.checkpoint as dcp

            err: BaseException | None = None
            if rank == 0:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    store.prepare(folder)
                except OSError as e:
                    err = e
            self._agree_on_failure(err, group)  # also the barrier before anyone writes into the folder
            t1 = time.perf_counter()
            # DCP gathers every rank's write error and raises the same CheckpointException on all ranks
            md = dcp.save(
                snap.tensors,
                storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True),
                process_group=group,
            )
            t2 = time.perf_counter()
            record["write_s"] = t2 - t1
            if self._kill_in_save is not None and self._kill_in_save == (rank, snap.step):
                _kill_self(f"{ENV_KILL_IN_SAVE}: rank {rank} during the save of step {snap.step}")
            names = sorted({info.relative_path for info in md.storage_data.values()})
            mine = [n for n in names if n.startswith(f"__{rank}_")]
            if rank == 0:
                mine += [n for n in names if not any(n.startswith(f"__{r}_") for r in range(world))]
            payload: dict[str, Any] = {
                "union": snap.union,
                "per_rank": snap.per_rank,
                "checks": snap.ext_checksums,
                "files": {},
            }
            try:
                payload["files"] = {n: store.digest(folder / n) for n in mine}
            except OSError as e:
                err = e
            record["hash_s"] = time.perf_counter() - t2
            record["bytes"] = float(sum(f["size"] for f in payload["files"].values()))
            self._agree_on_failure(err, group)
            gathered: list[Any] | None = [None] * world if rank == 0 else None
            dist.gather_object(payload, gathered, dst=0, group=group)
            if rank == 0:
                assert gathered is not None
                try:
                    self._finalize(snap, folder, reason, gathered)
                except Exception as e:  # noqa: BLE001 - every rank must learn of it
                    err = e
            self._agree_on_failure(err, group)  # the marker exists when this returns without error
            record["total_s"] = time.perf_counter() - t0

        return job

    def _agree_on_failure(self, err: BaseException | None, group: Any) -> None:
        """Collective: if any rank failed, every rank raises (its own error, or a copy of the first one:
        an OSError keeps errno, message and file name)."""
        desc = None
        if err is not None:
            desc = (
                ("os", err.errno, err.strerror, err.filename)
                if isinstance(err, OSError)
                else ("other", f"{type(err).__name__}: {err}")
            )
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, desc, group=group)
        if err is not None:
            raise err
        first = next((d for d in everyone if d is not None), None)
        if first is None:
            return
        who = [r for r, d in enumerate(everyone) if d is not None]
        if first[0] == "os":
            raise OSError(first[1], f"{first[2]} (on rank {who[0]})", first[3])
        raise RuntimeError(f"checkpoint save failed on rank(s) {who}: {first[1]}")

    def _finalize(self, snap: st.Snapshot, folder: Path, reason: str, gathered: list[dict[str, Any]]) -> None:
        from dist_opt.checkpoint import state as st
        from dist_opt.checkpoint.resume_policy import config_json

        keys = set().union(*(p["checks"] for p in gathered))
        differ = sorted(k for k in keys if len({p["checks"].get(k) for p in gathered}) > 1)
        if differ:
            raise RuntimeError(
                f"extension state differs between ranks: {', '.join(differ[:5])} (an "
                "extension's state_dict must be identical on every rank, or set "
                "checkpoint_per_rank = True)"
            )
        union: Any = gathered[0]["union"]
        for p in gathered[1:]:
            union = st.merge(union, p["union"])
        files: dict[str, Any] = {}
        for p in gathered:
            files.update(p["files"])
        files[".metadata"] = store.digest(folder / ".metadata")
        manifest = {
            "format": store.FORMAT,
            "version": store.VERSION,
            "step": snap.step,
            "reason": reason,
            "world_size": self.world,
            "created_unix": time.time(),
            "torch": torch.__version__,
            "config": config_json(self.cfg),
            "layout": snap.layout,
            "shared": snap.shared,
            "rule_state": union,
            "ranks": [p["per_rank"] for p in gathered],
            "files": files,
        }
        store.finalize(folder, manifest)
        store.prune(self.root, self.cfg.checkpoint.keep)

    # -- resume ----------------------------------------------------------------------------------
    def load(self, trainer: TrainerView, folder: Path) -> None:
        """Validate ``folder`` against ``trainer`` and load it (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        from dist_opt.checkpoint import resume_policy as rp
        from dist_opt.checkpoint import state as st
        from dist_opt.checkpoint.safe_metadata import SafeFileSystemReader, load_metadata

        t0 = time.perf_counter()
        plan, problems, decision = None, [], rp.Decision()
        try:
            manifest = store.read_manifest(folder)
            md = load_metadata(folder)
        except CheckpointError as e:
            problems = e.problems
        else:
            decision = rp.decide(manifest.get("config", {}), rp.config_json(self.cfg), int(manifest["step"]))
            try:
                plan = st.plan_load(trainer, self, manifest, md)
            except CheckpointError as e:
                problems = ["does not fit this run:", *(f"  {p}" for p in e.problems)]
            problems += decision.refused  # config keys that cannot change on resume (resume_policy)
        agree(
            problems, folder, self.group, self.world
        )  # every rank refuses, or none does (DCP's load is collective)
        assert plan is not None
        t1 = time.perf_counter()
        try:
            dcp.load(
                plan.templates,
                storage_reader=SafeFileSystemReader(folder),
                planner=DefaultLoadPlanner(),
                process_group=self.group,
            )
        except CheckpointError:
            raise
        except load_failures() as e:  # DCP wraps every rank's failure in a BaseException
            raise CheckpointError([data_problem(e)], folder) from None
        t2 = time.perf_counter()
        notes: list[str] = []
        fresh_schedule = trainer.schedule.state_dict()  # built from this run's config
        try:
            notes = st.apply(trainer, self, plan)
            rp.apply_changes(decision, trainer, fresh_schedule)
        except CheckpointError as e:
            problems = e.problems
        agree(problems, folder, self.group, self.world)
        nbytes = sum(
            v.to_local().nbytes if hasattr(v, "to_local") else v.nbytes for v in plan.templates.values()
        )
        self.last_load = {
            "plan_s": t1 - t0,
            "read_s": t2 - t1,
            "apply_s": time.perf_counter() - t2,
            "bytes": float(nbytes),
        }
        self._last_step = trainer.step
        self.loaded_from = folder
        if self.rank == 0:
            notes += decision.lines + rp.end_notes(trainer.step, trainer.total_steps)
            _say(
                f"resumed from {folder} (step {trainer.step}, saved on {manifest['world_size']} rank(s), "
                f"now {self.world})"
            )
            for n in notes:
                _say(n)


def _say(msg: str) -> None:
    print(f"dist-opt: {msg}", file=sys.stderr, flush=True)
