"""Predicted step time and communication share of DDP vs dist-opt ZeRO-1/2 at 8-4096 GPUs.

Pure model (``dist_opt.plan``): runs in well under a second and writes ``bench/results/scaling.md``.
It also checks the model against the 2-rank CPU measurements in ``bench/results/step.md`` with the
``loopback_gloo`` preset; ``--validate`` first measures the loopback link (α, β) with two gloo
ranks on this machine (a few seconds) and checks against that too.

    python -m bench.scaling [--validate] [--out bench/results/scaling.md]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dist_opt.plan import PRESETS, CostModel, Fabric, Link, Workload, step_time

GPUS = (8, 64, 512, 4096)
MODES = ("ddp", "zero1", "zero2")
SEQ = 2048  # tokens per sequence
PER_GPU = 8  # sequences per GPU per step (weak scaling: global batch = 8 × GPUs)
MFU = 0.5  # share of peak flop/s a well-tuned GPT step reaches (Narayanan et al. 2021 report ~52 % on A100)
ADAMW_BYTES = 28  # bytes of memory traffic per parameter of an fp32 AdamW update (see step.md's bound)
STEP_MD = Path(__file__).parent / "results" / "step.md"


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_tflops: float  # dense bf16
    hbm_TBps: float
    intra: str
    inter: str
    source: str


GPU_CLASSES = (
    Gpu("A100 SXM 80GB", 312.0, 2.039, "nvlink3", "ib_hdr", "NVIDIA A100 datasheet; DGX A100: 8 HDR NICs"),
    Gpu("H100 SXM 80GB", 989.0, 3.35, "nvlink4", "ib_ndr", "NVIDIA H100 datasheet; DGX H100: 8 NDR NICs"),
)
MODELS = (("GPT 1.3B", 1.3e9), ("GPT 13B", 13e9))


def memory_gb(mode: str, params: float, gpus: int) -> float:
    """Model states per GPU, bf16 params + grads, fp32 master + Adam m, v (Rajbhandari et al. 2020)."""
    if mode == "ddp":
        return 16 * params / 1e9
    if mode == "zero1":
        return (4 + 12 / gpus) * params / 1e9
    return (2 + 14 / gpus) * params / 1e9


def parse_step_md(path: Path = STEP_MD) -> tuple[int, dict[str, dict[str, float]]]:
    """Ψ and, per dist-opt AdamW row of step.md, its numeric columns (both tables merged)."""
    text = path.read_text(encoding="utf-8")
    m = re.search(r"Ψ = ([\d,]+) parameters", text)
    if m is None:
        raise ValueError(f"{path}: no 'Ψ = N parameters' line")
    rows: dict[str, dict[str, float]] = {}
    header: list[str] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells
            continue
        if cells[0].startswith("dist-opt adamw"):
            for h, c in zip(header[1:], cells[1:], strict=False):
                num = re.match(r"[\d.]+", c)
                if num:
                    rows.setdefault(cells[0], {})[h] = float(num.group())
    return int(m.group(1).replace(",", "")), rows


def gpu_workload(gpu: Gpu, params: float, update_vs_bound: float) -> Workload:
    return Workload(
        params=int(params),
        sample_s=6 * params * SEQ / (gpu.peak_tflops * 1e12 * MFU),
        update_s_per_param=update_vs_bound * ADAMW_BYTES / (gpu.hbm_TBps * 1e12),
        grad_bytes=2.0,
        param_bytes=2.0,
    )


def scaling_tables(update_vs_bound: float) -> list[str]:
    out: list[str] = []
    for gpu in GPU_CLASSES:
        cm = CostModel(8, PRESETS[gpu.intra], PRESETS[gpu.inter], gpu.intra, gpu.inter)
        out += [
            f"### {gpu.name}: {gpu.peak_tflops:g} TFLOP/s bf16 × MFU {MFU}, HBM {gpu.hbm_TBps:g} TB/s, "
            f"{cm.describe()}",
            "",
            "| model | GPUs | mode | step ms | compute ms | comm ms | comm % | update ms | model states GB/GPU |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, params in MODELS:
            work = gpu_workload(gpu, params, update_vs_bound)
            for g in GPUS:
                for mode in MODES:
                    st = step_time(mode, work, PER_GPU * g, g, cm)
                    mem = memory_gb(mode, params, g)
                    fits = "" if mem <= 80 else " (> 80 GB)"
                    out.append(
                        f"| {name} | {g} | {mode} | {st.total_s * 1e3:.1f} | {st.compute_s * 1e3:.1f} | "
                        f"{st.exposed_comm_s * 1e3:.1f} | {100 * st.comm_share:.1f} | {st.update_s * 1e3:.2f} | "
                        f"{mem:.1f}{fits} |"
                    )
        out.append("")
    return out


def measure_loopback(repeats: int = 7) -> Link:
    """α and β of gloo all-reduce between 2 local ranks: medians at 1 KiB and 32 MiB."""
    from bench.common import run_ranks

    res = run_ranks(_allreduce_times, 2, (repeats,))[0]
    small, big = res[1024], res[32 * 2**20]
    # 2 ranks, ring all-reduce: 2α + n/β
    beta = (32 * 2**20 - 1024) / max(big - small, 1e-9)
    return Link(max(small - 1024 / beta, 0.0) / 2, beta)


def _allreduce_times(rank: int, world: int, repeats: int) -> dict[int, float]:
    import torch
    import torch.distributed as dist

    out = {}
    for nbytes in (1024, 32 * 2**20):
        t = torch.ones(nbytes // 4)
        for _ in range(2):
            dist.all_reduce(t)
        ts = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            ts.append(time.perf_counter() - t0)
        out[nbytes] = sorted(ts)[len(ts) // 2]
    return out


def validation(links: list[tuple[str, Link]]) -> tuple[list[str], float]:
    """Predicted vs measured comm and step of step.md's dist-opt AdamW rows; also the update/bound ratio."""
    psi, rows = parse_step_md()
    z0 = rows["dist-opt adamw, zero 0"]
    u = z0["update ms"] / 1e3 / psi  # measured seconds per parameter updated (zero 0 updates all Ψ)
    z2 = rows["dist-opt adamw, zero 2"]
    update_vs_bound = z2["update ms"] / z2["bound ms (B/param)"]
    out = [
        "| link | mode | comm ms predicted | measured | × | step ms predicted | measured | × |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, link in links:
        fab = Fabric(link.bandwidth_Bps / 1e9, link.latency_s * 1e6)
        cm = CostModel(2, fab, fab, "loopback", "loopback", algorithm="ring")
        for stage, mode in enumerate(MODES):
            r = rows[f"dist-opt adamw, zero {stage}"]
            # the parameter all-gather: the part waited for inside step() plus, with the overlapped
            # gather, the part the next forward waits for (the "exposed" column counts both)
            gather_in_step = r.get("param all-gather ms in step", r.get("param all-gather ms", 0.0))
            gather = r.get("param all-gather exposed ms", gather_in_step)
            # forward + backward + zero_grad, without the all-gather wait the forward absorbed
            compute = (r["step ms (median)"] - r["opt.step() ms"] - (gather - gather_in_step)) / 1e3
            work = Workload(psi, compute / 32, u, 4.0, 4.0)  # 32 samples per rank
            st = step_time(mode, work, 64, 2, cm)
            comm_meas = r["grad-sync wait ms"] + gather
            out.append(
                f"| {label} | {mode} (zero {stage}) | {st.exposed_comm_s * 1e3:.1f} | {comm_meas:.1f} | "
                f"{st.exposed_comm_s * 1e3 / comm_meas:.2f} | {st.total_s * 1e3:.1f} | "
                f"{r['step ms (median)']:.1f} | {st.total_s * 1e3 / r['step ms (median)']:.2f} |"
            )
    return out, update_vs_bound


FORMULAS = """\
## Model

α-β model (`dist_opt/plan/collectives.py`): n bytes over one link cost α + n/β. With p ranks and n the
full tensor's bytes, ring all-reduce 2(p-1)α + 2(p-1)/p·n/β, ring reduce-scatter and all-gather
(p-1)α + (p-1)/p·n/β; tree all-reduce 2⌈log2 p⌉α + 2n/β, tree reduce-scatter/all-gather
⌈log2 p⌉α + (p-1)/p·n/β; the cheaper of ring and tree is used. Across N nodes of g GPUs the
collectives are hierarchical: all-reduce = intra reduce-scatter(n, g) + inter all-reduce(n/g, N) +
intra all-gather(n, g); reduce-scatter and all-gather = their intra step on n plus their inter step
on n/g; the g concurrent inter-node rings share the node's NICs.

Step (`dist_opt/plan/step_model.py`), Ψ parameters, p GPUs, global batch B:
compute = t_sample·B/p; DDP: all-reduce of the gradients (Ψ·2 bytes bf16) + update u·Ψ;
dist-opt ZeRO-1: all-reduce + update u·Ψ/p + all-gather of the parameters (Ψ·2 bytes);
ZeRO-2: reduce-scatter + update u·Ψ/p + all-gather. No overlap of communication with backward is
assumed (the communication columns are what an unoverlapped step pays; with overlap DDP's
all-reduce can hide behind backward, so the DDP rows are an upper bound).

Figures: t_sample = 6·Ψ·2048 flop (forward + backward of one 2048-token sequence, Kaplan et al.
2020) / (peak bf16 flop/s × MFU {mfu}); peak 312 TFLOP/s (A100 SXM) and 989 TFLOP/s (H100 SXM),
HBM 2.039 and 3.35 TB/s (NVIDIA datasheets). Links: NVLink 3 300 GB/s and NVLink 4 450 GB/s per
direction per GPU, InfiniBand HDR 25 GB/s and NDR 50 GB/s per NIC with one NIC per GPU (DGX A100 /
DGX H100), latencies 3 µs (NVLink) and 5 µs (InfiniBand) per step (rough; presets in
`dist_opt/plan/fabric.py`). Update: AdamW moves {adamw} bytes per parameter; u = {ratio:.2f} × {adamw} B / HBM
bandwidth, {ratio:.2f} being dist-opt AdamW ZeRO-2's measured update time over its memory-traffic bound in
`bench/results/step.md` (the update is memory-bound on CPU and GPU alike). Weak scaling: {per_gpu}
sequences per GPU (global batch {per_gpu}·p). Model states per GPU: DDP 16Ψ bytes, ZeRO-1 (4 + 12/p)Ψ,
ZeRO-2 (2 + 14/p)Ψ (bf16 parameters and gradients, fp32 master and Adam moments; Rajbhandari et al.
2020); activations not included.
"""


def report(validate: bool) -> str:
    links = [
        (
            "loopback_gloo preset",
            Link(PRESETS["loopback_gloo"].latency_us * 1e-6, PRESETS["loopback_gloo"].bandwidth_GBps * 1e9),
        )
    ]
    load = os.getloadavg()[0]
    if validate:
        link = measure_loopback()
        links.append(
            (
                f"measured now: {link.bandwidth_Bps / 1e9:.2f} GB/s, {link.latency_s * 1e6:.0f} µs (load {load:.1f})",
                link,
            )
        )
    val, ratio = validation(links)
    lines = [
        "# bench.scaling: predicted step time and communication share, DDP vs dist-opt ZeRO-1/2",
        "",
        f"Command: `python -m bench.scaling{' --validate' if validate else ''}` (pure model; `--validate` also "
        "measures the loopback link)  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        FORMULAS.format(mfu=MFU, adamw=ADAMW_BYTES, ratio=ratio, per_gpu=PER_GPU),
        "## Predictions",
        "",
        "Reading: ZeRO-2 moves the same bytes as DDP (reduce-scatter + all-gather = one all-reduce) and",
        "updates 1/p of the parameters, so it is the fastest of the three at every scale; dist-opt's ZeRO-1",
        "adds an all-gather to DDP's all-reduce (1.5× the bytes), which costs more than its sharded update",
        "saves beyond one node. Past a few nodes the communication share stops growing: the hierarchical",
        "ring's bandwidth term tends to 2·n/(g·β_inter) whatever the node count, and latency is small",
        "next to GB-sized gradients. DDP's 16 bytes/parameter of model state do not fit a 13B model in 80 GB.",
        "",
        *scaling_tables(ratio),
        "## Validation against the 2-rank CPU measurements (bench/results/step.md)",
        "",
        "Each dist-opt AdamW row of step.md (Ψ = 25.2M fp32, 2 gloo ranks, 32 samples per rank): compute is",
        "taken from the row (step − opt.step()), u from the ZeRO-0 row's update time / Ψ, and the",
        "communication (all-reduce / reduce-scatter of 4Ψ bytes, all-gather of 4Ψ bytes, ring, p = 2) is",
        "predicted; measured comm = grad-sync wait + param all-gather. The wait only counts what backward",
        "did not hide, so predicted/measured comm above 1 is expected where the gradient reduction overlaps",
        "(dist-opt ZeRO-0 reduces buckets during backward; ZeRO-2 reduce-scatters after it). step.md was",
        "measured at load average ~2.6 on 2 cores; the loopback_gloo preset (1.1 GB/s, 100 µs) was measured",
        "at load ~7, and a `--validate` link measured on a loaded machine is slower still.",
        "",
        *val,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true", help="also measure the loopback link (2 gloo ranks)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "scaling.md"))
    args = p.parse_args(argv)
    text = report(args.validate)
    Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
