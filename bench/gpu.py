"""GPU checks and timings of the native engine (needs CUDA; prints "no CUDA device" and exits 0 without).

    python -m bench.gpu                          # (a) and (b), writes bench/results/gpu.md
    python -m bench.gpu --skip-timing            # only (a)
    python -m bench.gpu --layers 4 --steps 3     # a smaller GPT for (b)

(a) CUDA == CPU: the same small model trained for ``--check-steps`` steps with adamw, lamb, lars and
    shampoo in fp32 by ShardedOptimizer on CUDA and on CPU (world 1); parameters must agree to fp32
    round-off (CUDA kernels differ in summation order, so not bitwise).
(b) a ~350M-parameter byte-level GPT (``dist_opt.tasks.stdlib_lm.ByteGPT``, d_model 1024, 28 layers) at
    bf16 on one GPU (world 1, nccl): dist-opt adamw and lamb with bf16 parameters and fp32 master shards
    against torch.optim.AdamW(fused=True) on fp32 parameters under bf16 autocast. Median step time,
    tokens/s and peak CUDA memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu.md"
RULES = ("adamw", "lamb", "lars", "shampoo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--check-steps", type=int, default=10, help="steps of the CUDA == CPU check (a)")
    p.add_argument("--layers", type=int, default=28, help="GPT layers for (b) (28 x d_model 1024 ~ 350M)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip-timing", action="store_true", help="only the CUDA == CPU check (a)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    for k in ("check_steps", "layers", "d_model", "seq_len", "batch", "steps"):
        if getattr(args, k) < 1:
            return f"--{k.replace('_', '-')} must be >= 1"
    if args.warmup < 0:
        return "--warmup must be >= 0"
    if args.d_model % 64:
        return "--d-model must be a multiple of 64 (heads of 64)"
    return None


# -- (a) CUDA == CPU -------------------------------------------------------------------------------
def _small_run(device: str, rule: str, steps: int) -> list[Any]:
    import torch
    from torch import nn

    from dist_opt.engine.sharded import ShardedOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 8)).to(device)
    hyper = {"precondition_frequency": 2, "max_preconditioner_dim": 16} if rule == "shampoo" else {}
    opt = ShardedOptimizer(model.named_parameters(), rule, lr=0.01, weight_decay=0.01, zero_stage=0, **hyper)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 16, generator=g).to(device), torch.randn(32, 8, generator=g).to(device)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().cpu() for p in model.parameters()]


def check_cuda_equals_cpu(steps: int) -> list[tuple[str, float, bool]]:
    import torch

    out = []
    for rule in RULES:
        a, b = _small_run("cuda", rule, steps), _small_run("cpu", rule, steps)
        diff = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
        ok = all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b, strict=True))
        out.append((rule, diff, ok))
    return out


# -- (b) ~350M GPT at bf16 --------------------------------------------------------------------------
def time_gpt(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    import torch
    from torch import nn

    from dist_opt.engine.sharded import ShardedOptimizer
    from dist_opt.tasks.stdlib_lm import ByteGPT

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = ByteGPT(args.seq_len, args.d_model, args.layers, args.d_model // 64)
    model.init_weights(torch.Generator().manual_seed(0))
    model = model.cuda()
    n = sum(p.numel() for p in model.parameters())
    if kind == "torch-adamw-fused":
        opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    else:
        model = model.to(torch.bfloat16)
        opt = ShardedOptimizer(
            model.named_parameters(), kind.removeprefix("dist-opt-"), lr=1e-4, zero_stage=0
        )
    idx = torch.randint(0, 256, (args.batch, args.seq_len + 1), device="cuda")
    x, y = idx[:, :-1], idx[:, 1:]
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).float().view(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    med = statistics.median(times)
    out = {
        "kind": kind,
        "params": n,
        "step_ms": 1e3 * med,
        "tokens_per_s": args.batch * args.seq_len / med,
        "peak_mem": torch.cuda.max_memory_allocated(),
        "loss": (losses[0], losses[-1]),
    }
    del model, opt
    return out


def render(
    args: argparse.Namespace, checks: list[tuple[str, float, bool]], rows: list[dict[str, Any]]
) -> str:
    import torch

    lines = [
        "# GPU: CUDA == CPU check and a ~350M GPT at bf16",
        "",
        f"Device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}.",
        "",
        f"## (a) CUDA vs CPU, fp32, {args.check_steps} steps (max |diff| of the parameters)",
        "",
        "| rule | max abs diff | within rtol 1e-4 / atol 1e-5 |",
        "| --- | --- | --- |",
        *[f"| {r} | {d:.2e} | {'yes' if ok else 'NO'} |" for r, d, ok in checks],
    ]
    if rows:
        lines += [
            "",
            f"## (b) ByteGPT d_model {args.d_model}, {args.layers} layers, seq {args.seq_len}, batch {args.batch}, "
            f"world 1 ({rows[0]['params'] / 1e6:.0f}M parameters)",
            "",
            "| optimizer | step ms (median) | tokens/s | peak CUDA memory | loss first → last |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            lines.append(
                f"| {r['kind']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_mem'] / 2**30:.2f} GiB | "
                f"{r['loss'][0]:.3f} → {r['loss'][1]:.3f} |"
            )
        lines += [
            "",
            "dist-opt rows: bf16 parameters, fp32 master copies and fp32 state (precision.params: bf16); "
            "torch row: fp32 parameters under bf16 autocast with the fused AdamW kernel.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    try:
        checks = check_cuda_equals_cpu(args.check_steps)
        rows = []
        if not args.skip_timing:
            for kind in ("torch-adamw-fused", "dist-opt-adamw", "dist-opt-lamb"):
                rows.append(time_gpt(args, kind))
                print(f"{kind}: {rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr)
    finally:
        dist.destroy_process_group()
    text = render(args, checks, rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
