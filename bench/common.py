"""Shared benchmark helpers: fresh gloo ranks on CPU, the 25M model, peak RSS, copy bandwidth.

Every call of :func:`run_ranks` starts ``world`` brand-new processes (forked from a forkserver
that has only imported torch), so a rank's peak RSS belongs to that one configuration. Ranks run with ``OMP_NUM_THREADS=1`` and one torch
thread, join a gloo group over loopback (``env://`` with MASTER_ADDR=127.0.0.1, which is also
what DeepSpeed's communication layer expects to find), run ``fn(rank, world, *args)`` and send
its (picklable) result back.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import platform
import queue
import resource
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from dist_opt.dist.ports import free_port

WIDTH, HIDDEN, BLOCKS = 512, 2048, 12


def limit_threads() -> None:
    """One intra-op thread (call before heavy torch work; the env var also covers OpenMP/MKL)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _rank_main(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results,
    env: dict[str, str],
    pg_timeout_s: float,
) -> None:
    os.environ.update(env)  # the parent's environment at the call plus the call's extras
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "LOCAL_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
    )
    try:
        limit_threads()
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s)
        )
        try:
            out = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))


_CTX: Any = None


def _context() -> Any:
    """A forkserver that has imported torch once (started with one thread): every rank is a fresh
    process forked from it, without paying torch's import again and without the parent's memory."""
    global _CTX
    if _CTX is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # read by OpenMP when the server loads torch
        os.environ["MKL_NUM_THREADS"] = "1"
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])
        _CTX = ctx
    return _CTX


def run_ranks(
    fn: Callable[..., Any],
    world: int = 2,
    args: tuple = (),
    *,
    timeout_s: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh gloo ranks; results in rank order.

    ``fn`` must be importable (module level). Raises RuntimeError with the first rank's
    traceback if any rank fails, TimeoutError if the ranks do not answer within ``timeout_s``.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    env = {**os.environ, **(extra_env or {})}  # forkserver children would otherwise see the server's env
    procs = [
        ctx.Process(
            target=_rank_main,
            daemon=True,
            args=(r, world, port, fn, args, results, env, min(timeout_s, 600.0)),
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)}: ranks "
                    f"{sorted(set(range(world)) - set(got))} gave no answer within {timeout_s:.0f}s"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if not p.is_alive() and p.exitcode not in (0, None) and r not in got
                ]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                continue
            got[rank] = (ok, value)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r][1] for r in range(world)]


def make_25m_model(width: int = WIDTH, hidden: int = HIDDEN, blocks: int = BLOCKS, seed: int = 0):
    """``blocks`` residual blocks x -> x + Linear(hidden→width)(GELU(Linear(width→hidden)(LayerNorm(x)))).

    With the defaults: 12 blocks of Linear 512→2048→512 + LayerNorm, 25,208,832 parameters.
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width, hidden)
            self.fc2 = nn.Linear(hidden, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))

    torch.manual_seed(seed)
    return nn.Sequential(*[Block() for _ in range(blocks)])


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: ``VmHWM`` from /proc/self/status, the high-water mark of this process's own address
    space. ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used there because Linux carries it across
    fork + exec, so a spawned rank would report at least its parent's peak. Elsewhere: ru_maxrss
    (KiB on Linux/BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return r if platform.system() == "Darwin" else r * 1024


def copy_bandwidth(numel: int = 64 * 2**20, repeats: int = 7) -> float:
    """Single-thread memory bandwidth in bytes/s from ``dst.copy_(src)`` on fp32 tensors well
    beyond the caches (default 256 MiB each), counting read + write (2 x 4 bytes per element);
    the best of ``repeats``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.rand(numel)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2 * 4 * numel / best


def machine_info() -> dict[str, str]:
    """CPU model, core count, memory, OS, library versions and the date (for results files)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import version

        info["deepspeed"] = version("deepspeed")
    except Exception:  # noqa: BLE001 - optional
        info["deepspeed"] = "not installed"
    return info


def fmt_bytes(n: float | None) -> str:
    """Human-readable MiB/GiB ('—' for unknown)."""
    if n is None:
        return "—"
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


# -- counting collectives at the ProcessGroup boundary -------------------------------------------
# ProcessGroup method -> (position of the argument holding the full tensor(s) S, ring factor f):
# per-rank traffic f·(N-1)/N·|S|, the convention of dist_opt.dist.collectives.Ledger
_COUNTED_OPS: dict[str, tuple[int, float, str]] = {
    "allreduce": (0, 2.0, "all_reduce"),
    "allreduce_coalesced": (0, 2.0, "all_reduce"),
    "reduce": (0, 1.0, "reduce"),
    "broadcast": (0, 1.0, "broadcast"),
    "allgather": (0, 1.0, "all_gather"),
    "_allgather_base": (0, 1.0, "all_gather"),
    "all_gather_single": (0, 1.0, "all_gather"),
    "allgather_into_tensor_coalesced": (0, 1.0, "all_gather"),
    "all_gather_single_coalesced": (0, 1.0, "all_gather"),
    "allgather_coalesced": (0, 1.0, "all_gather"),
    "reduce_scatter": (1, 1.0, "reduce_scatter"),
    "_reduce_scatter_base": (1, 1.0, "reduce_scatter"),
    "reduce_scatter_single": (1, 1.0, "reduce_scatter"),
    "reduce_scatter_tensor_coalesced": (1, 1.0, "reduce_scatter"),
    "reduce_scatter_single_coalesced": (1, 1.0, "reduce_scatter"),
    "alltoall_base": (1, 1.0, "all_to_all"),
    "all_to_all_single": (1, 1.0, "all_to_all"),
}


def _nbytes(x: Any) -> int:
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return int(x.numel() * x.element_size()) if hasattr(x, "element_size") else 0


class CommCounter:
    """Counts the collectives issued from Python while active, at the ``ProcessGroup`` methods.

    As a context manager in a rank it replaces the methods of
    ``torch._C._distributed_c10d.ProcessGroup`` by counting wrappers (the originals run
    unchanged) and restores them on exit, so it sees every collective that Python code issues
    (torch.distributed's functions, however a library bound them) but not those issued from C++
    (DDP's reducer). ``bytes[op]`` uses the ring convention above; ``calls[op]`` counts calls.
    """

    def __init__(self, world: int):
        self.world = world
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._saved: dict[str, Any] = {}

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def _wrap(self, name: str, fn: Any) -> Callable[..., Any]:
        pos, factor, op = _COUNTED_OPS[name]

        def counted(pg: Any, *a: Any, **k: Any) -> Any:
            size = _nbytes(a[pos]) if len(a) > pos else 0
            n = self.world
            self.calls[op] = self.calls.get(op, 0) + 1
            self.bytes[op] = self.bytes.get(op, 0) + (int(factor * (n - 1) / n * size) if n > 1 else 0)
            return fn(pg, *a, **k)

        return counted

    def __enter__(self) -> CommCounter:
        from torch._C._distributed_c10d import ProcessGroup

        for name in _COUNTED_OPS:
            raw = ProcessGroup.__dict__.get(name)  # the descriptor itself, restored as it was on exit
            if raw is not None:
                self._saved[name] = raw
                setattr(ProcessGroup, name, self._wrap(name, getattr(ProcessGroup, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._C._distributed_c10d import ProcessGroup

        for name, fn in self._saved.items():
            setattr(ProcessGroup, name, fn)
        self._saved.clear()


class AllocCounter:
    """Counts the tensors of at least ``min_bytes`` that operators create (new storage, not a view or
    an in-place result of an input), at the dispatcher, while active: ``with AllocCounter() as c:``.

    It sees what Python and autograd allocate through torch's operators (activations, gradients,
    temporaries, communication buffers made with torch), not memory that C++ code such as gloo or
    DDP's reducer allocates internally."""

    def __init__(self, min_bytes: int = 2**20):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                counter._see(args, kwargs, out)
                return out

        self.min_bytes, self.count, self.bytes = min_bytes, 0, 0
        self._mode = _Mode()

    def _see(self, args: Any, kwargs: Any, out: Any) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        def ptrs(x: Any) -> set[int]:
            return {t.untyped_storage().data_ptr() for t in tree_leaves(x) if isinstance(t, torch.Tensor)}

        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        big = [t for t in outs if t.untyped_storage().nbytes() >= self.min_bytes]
        if not big:
            return
        seen = ptrs((args, kwargs))
        for t in big:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                self.count += 1
                self.bytes += st.nbytes()

    def __enter__(self) -> AllocCounter:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
