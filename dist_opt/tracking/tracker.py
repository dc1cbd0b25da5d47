"""The :class:`Tracker`: ``metrics.jsonl`` always, plus a W&B run (offline by default), on rank 0 only."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dist_opt.config.loader import to_dict
from dist_opt.config.schema import Config
from dist_opt.tracking.metrics_file import MetricsFile, to_scalar
from dist_opt.tracking.wandb_run import (
    check_run_id,
    init_kwargs,
    new_run_id,
    previous_sessions_last_step,
    start_run,
    wait_for_exit_record,
)

METRICS_FILE = "metrics.jsonl"
FINISH_WAIT_S = 30.0


def wandb_config(cfg: Config) -> dict:
    """The resolved config as logged to W&B: secret-named keys redacted, secret env values scrubbed."""
    return to_dict(cfg)


def _scalars(metrics: Mapping[str, Any], reserved: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric name {k!r}: must be a string")
        if k in reserved:
            raise ValueError(f"metric name {k!r} is reserved")
        out[k] = to_scalar(k, v)
    return out


class Tracker:
    """Metrics sink of a run.

    Rank != 0: a no-op (no files, no W&B run). Rank 0: writes ``<run_dir>/metrics.jsonl`` (see
    :mod:`dist_opt.tracking.metrics_file` for its format and resume policy) and, unless the effective W&B
    mode is ``disabled``, mirrors every :meth:`log` to a W&B run with id ``run_id`` (given: a resumed run
    continues the same W&B run via ``resume="allow"``; None: ``WANDB_RUN_ID`` or a new random id, so
    ``run_id`` always exists on rank 0, even with W&B disabled).

    W&B history steps are strictly increasing: logs at the same step as the previous log are merged
    into that row (train and eval metrics of one step); a log at an earlier step is not sent to W&B
    (warned once); ``metrics.jsonl`` gets every line.

    Resume (``resume_step`` given): metrics.jsonl keeps its lines up to ``resume_step``. The W&B run
    already holds the steps up to ``L`` = the last step earlier sessions persisted (online: reported by
    the server; offline: read from the earlier ``.wandb`` files of the same id under the W&B dir).
    Kept lines with ``L < step <= resume_step`` (lost by a killed offline session) are replayed to W&B
    from metrics.jsonl, and later logs with ``step <= L`` are not re-sent: the concatenated W&B history
    has every step once, strictly increasing.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        rank: int,
        run_id: str | None = None,
        resume_step: int | None = None,
    ):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.wandb_run: Any = None
        self.wandb_mode = "disabled"
        self._file: MetricsFile | None = None
        self._wandb_floor: int | None = None
        self._wandb_last: int | None = None
        self._warned: set[str] = set()
        self._closed = False
        if resume_step is not None and (isinstance(resume_step, bool) or resume_step < 0):
            raise ValueError(f"resume_step={resume_step!r}: expected a step >= 0 or None")
        if rank != 0:
            self.run_id: str | None = run_id
            return
        self.run_id = check_run_id(run_id or os.environ.get("WANDB_RUN_ID") or new_run_id())
        self._file = MetricsFile(self.metrics_path, resume_step=resume_step)
        try:
            kwargs = init_kwargs(cfg.tracking.wandb, self.run_dir, self.run_id, wandb_config(cfg))
            if kwargs is not None:
                self._start_wandb(kwargs)
            if self.wandb_run is not None and resume_step is not None:
                self._catch_up(self._file.kept)
        except BaseException:
            self.close(exit_code=1)
            raise

    @property
    def active(self) -> bool:
        """True on rank 0 (the rank that writes)."""
        return self._file is not None

    def _start_wandb(self, kwargs: dict[str, Any]) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            print(
                "tracking: wandb is not installed, metrics go to metrics.jsonl only "
                "(pip install 'dist-opt[wandb]' or set tracking.wandb.mode=disabled)",
                file=sys.stderr,
            )
            return
        try:
            self.wandb_run = start_run(kwargs)
        except Exception as e:
            raise RuntimeError(f"tracking.wandb: wandb.init failed (mode={kwargs['mode']}): {e}") from e
        self.wandb_mode = kwargs["mode"]

    def _catch_up(self, kept: list[dict]) -> None:
        self._wandb_floor = previous_sessions_last_step(self.wandb_run, self.wandb_mode)
        for row in kept:
            step = row["step"]
            if self._wandb_floor is None or step > self._wandb_floor:
                self._send({k: v for k, v in row.items() if k != "step"}, step)

    def _warn_once(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(
                f"tracking: {msg} (further such logs are not sent to W&B either)",
                RuntimeWarning,
                stacklevel=4,
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Write ``{"step": step, **metrics}`` to metrics.jsonl and log it to W&B at ``step``."""
        if self._file is None:
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}: expected an int >= 0")
        row = _scalars(metrics, reserved=("step", "event"))
        self._file.write({"step": step, **row})
        if self.wandb_run is not None:
            self._send(row, step)

    def _send(self, row: dict[str, Any], step: int) -> None:
        if self._wandb_floor is not None and step <= self._wandb_floor:
            self._warn_once(
                "resume",
                f"step {step}: W&B run {self.run_id} already holds steps up to {self._wandb_floor} "
                "from before the resume; not re-logged",
            )
            return
        if self._wandb_last is not None and step < self._wandb_last:
            self._warn_once(
                "order", f"step {step} < last logged step {self._wandb_last}; W&B steps must increase"
            )
            return
        self.wandb_run.log({k: v for k, v in row.items() if v is not None}, step=step)
        self._wandb_last = step

    def summary(self, metrics: Mapping[str, Any]) -> None:
        """Run summary: a ``{"event": "summary", ...}`` line and the W&B run summary."""
        if self._file is None:
            return
        row = _scalars(metrics, reserved=("event",))
        self._file.write({"event": "summary", **row})
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in row.items() if v is not None})

    def close(self, exit_code: int = 0) -> None:
        """Finish the W&B run (``exit_code`` != 0 marks it failed) and close metrics.jsonl; idempotent.

        Returns once the W&B run file holds the exit record (up to ``FINISH_WAIT_S``): ``run.finish()``
        alone returns before W&B's service has flushed it."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.wandb_run is not None:
                sync_file = self.wandb_run.settings.sync_file
                self.wandb_run.finish(exit_code=exit_code)
                if sync_file and not wait_for_exit_record(sync_file, FINISH_WAIT_S):
                    warnings.warn(
                        f"tracking: W&B has not completed {sync_file} after {FINISH_WAIT_S:.0f} s",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        finally:
            if self._file is not None:
                self._file.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(0 if exc_type is None else 1)
