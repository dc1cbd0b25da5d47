"""Gradient noise scale (McCandlish et al. 2018) on a synthetic problem with a known per-sample gradient covariance."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dist_opt.noise_scale import NoiseScale

D, RANKS, B_SMALL = 16, 8, 4
B_BIG = RANKS * B_SMALL


def _problem(seed: int = 0):
    """True gradient G and a non-isotropic noise map A (Sigma = A A^T), scaled to |G|^2 = 1, tr Sigma = 16."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=D)
    g /= np.linalg.norm(g)
    a = rng.normal(size=(D, D)) * np.linspace(0.2, 2.0, D)
    a *= math.sqrt(16.0 / np.trace(a @ a.T))
    return g, a


def _step_norms(rng, g, a, steps: int):
    """Per step: mean over ranks of |local mean grad|^2 and |global mean grad|^2.

    Per-sample gradients g_i = G + A z_i with Rademacher z_i (mean 0, covariance I; not Gaussian).
    """
    z = rng.choice([-1.0, 1.0], size=(steps, RANKS, B_SMALL, D))
    per_sample = g + z @ a.T
    local = per_sample.mean(axis=2)  # (steps, ranks, D)
    local_sq_mean = (local**2).sum(-1).mean(-1)
    global_sq = (local.mean(axis=1) ** 2).sum(-1)
    return local_sq_mean, global_sq


def test_estimates_are_exact_at_the_expected_norms():
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B; plugging the expectations in must give back both unknowns
    g2, tr = 0.7, 13.0
    est_tr, est_g2 = NoiseScale.estimates(g2 + tr / B_SMALL, g2 + tr / B_BIG, B_SMALL, B_BIG)
    assert est_tr == pytest.approx(tr, rel=1e-12) and est_g2 == pytest.approx(g2, rel=1e-12)


def test_both_components_are_unbiased():
    g, a = _problem()
    true_tr, true_g2 = float(np.trace(a @ a.T)), float(g @ g)
    rng = np.random.default_rng(1)
    k = 20000
    local_sq, global_sq = _step_norms(rng, g, a, k)
    est_tr, est_g2 = NoiseScale.estimates(local_sq, global_sq, B_SMALL, B_BIG)  # vectorised over steps
    for est, truth in ((est_tr, true_tr), (est_g2, true_g2)):
        se = est.std(ddof=1) / math.sqrt(k)
        assert abs(est.mean() - truth) < 4 * se, (est.mean(), truth, se)  # 4 standard errors
    # the test has power: the naive |G_big|^2 misses |G|^2 by tr(Sigma)/B_big = 0.5, dozens of SEs
    naive_se = global_sq.std(ddof=1) / math.sqrt(k)
    assert abs(global_sq.mean() - true_g2 - true_tr / B_BIG) < 4 * naive_se
    assert abs(global_sq.mean() - true_g2) > 20 * naive_se


def test_b_simple_converges_to_trace_over_g2():
    g, a = _problem()
    truth = float(np.trace(a @ a.T)) / float(g @ g)  # 16
    ns = NoiseScale(ema=0.99)
    assert ns.b_simple is None and ns.trace_sigma is None and ns.g2 is None and ns.metrics() == {}
    rng = np.random.default_rng(2)
    for _ in range(3):
        local_sq, global_sq = _step_norms(rng, g, a, 1000)
        for ls, gs in zip(local_sq, global_sq, strict=True):
            assert ns.update(float(ls), float(gs), B_SMALL, B_BIG)
    # stated tolerance 15%: the EMA averages ~200 steps; the single-step relative std of the |G|^2
    # estimate is ~0.5 here, so the ratio's relative std is ~4% and 15% is > 3.5 sigma
    assert ns.b_simple == pytest.approx(truth, rel=0.15)
    assert ns.trace_sigma == pytest.approx(16.0, rel=0.10) and ns.g2 == pytest.approx(1.0, rel=0.15)
    m = ns.metrics()
    assert m == {
        "noise_scale/b_simple": ns.b_simple,
        "noise_scale/trace_sigma": ns.trace_sigma,
        "noise_scale/g2": ns.g2,
    }


def test_ratio_of_emas_not_ema_of_ratios():
    ns = NoiseScale(ema=0.5)
    steps = [(3.0, 2.0), (10.0, 6.0)]  # (local_sq_mean, global_sq) with b_small=1, b_big=2
    ests = [NoiseScale.estimates(ls, gs, 1, 2) for ls, gs in steps]
    for ls, gs in steps:
        ns.update(ls, gs, 1, 2)
    # bias-corrected EMA with ema=0.5 weights the two steps 1/3 and 2/3
    w = (1 / 3, 2 / 3)
    tr = sum(wi * e[0] for wi, e in zip(w, ests, strict=True))
    g2 = sum(wi * e[1] for wi, e in zip(w, ests, strict=True))
    assert ns.trace_sigma == pytest.approx(tr) and ns.g2 == pytest.approx(g2)
    assert ns.b_simple == pytest.approx(tr / g2)
    ema_of_ratios = sum(wi * e[0] / e[1] for wi, e in zip(w, ests, strict=True))
    assert ns.b_simple != pytest.approx(ema_of_ratios)


def test_first_update_and_ema_zero():
    ns = NoiseScale(ema=0.9)
    ns.update(5.0, 2.0, 2, 8)
    tr, g2 = NoiseScale.estimates(5.0, 2.0, 2, 8)
    assert ns.trace_sigma == pytest.approx(tr) and ns.g2 == pytest.approx(g2)  # bias-corrected
    last = NoiseScale(ema=0.0)
    for ls, gs in [(5.0, 2.0), (7.0, 3.0)]:
        last.update(ls, gs, 2, 8)
    assert (last.trace_sigma, last.g2) == pytest.approx(NoiseScale.estimates(7.0, 3.0, 2, 8))


def test_invalid_inputs_and_nonfinite_steps():
    with pytest.raises(ValueError, match="b_big == b_small"):
        NoiseScale(0.9).update(1.0, 1.0, 4, 4)
    with pytest.raises(ValueError, match="b_big=2 < b_small=4"):
        NoiseScale(0.9).update(1.0, 1.0, 4, 2)
    with pytest.raises(ValueError, match="ema"):
        NoiseScale(1.0)
    ns = NoiseScale(0.9)
    ns.update(5.0, 2.0, 2, 8)
    before = ns.state_dict()
    assert ns.update(math.nan, 2.0, 2, 8) is False and ns.update(math.inf, 2.0, 2, 8) is False
    assert ns.state_dict() == before
    noisy = NoiseScale(0.9)
    noisy.update(1.0, 0.8, 1, 2)  # |G|^2 estimate = 2*0.8 - 1 = 0.6 > 0
    noisy.update(1.0, 0.1, 1, 2)  # pulls the |G|^2 EMA below zero
    assert noisy.g2 < 0 and math.isnan(noisy.b_simple)


def test_state_dict_roundtrip():
    rng = np.random.default_rng(3)
    data = [(float(x), float(x) * 0.4, 4, 16) for x in rng.uniform(1, 2, size=20)]
    a, b = NoiseScale(0.8), NoiseScale(0.8)
    for d in data[:10]:
        a.update(*d)
    b.load_state_dict(a.state_dict())
    for d in data[10:]:
        a.update(*d)
        b.update(*d)
    assert (a.b_simple, a.trace_sigma, a.g2, a.updates) == (b.b_simple, b.trace_sigma, b.g2, b.updates)
    with pytest.raises(KeyError, match="missing"):
        NoiseScale(0.8).load_state_dict({"trace": 1.0})


# -- one rank: micro-batches of gradient accumulation as the small batch (dist_opt/noise_probe.py) --
def test_micro_batch_probe_hand_computed():
    import torch

    from dist_opt.noise_probe import MicroBatchProbe, noise_metrics

    model = torch.nn.Linear(2, 1, bias=False)
    probe = MicroBatchProbe(model)
    # micro-step k's loss is <w, a_k>, so its gradient is exactly a_k; autograd accumulates into w.grad
    for a in ([3.0, 0.0], [1.0, 2.0]):
        (model.weight * torch.tensor([a])).sum().backward()
        probe.after_micro_step()
    # mean_k |a_k|^2 = (9 + 5) / 2 = 7; |mean_k a_k|^2 = |(2, 1)|^2 = 5
    assert probe.take() == pytest.approx((7.0, 5.0))
    assert probe.take() is None  # reset after take
    model.weight.grad = None  # the optimizer's zero_grad between steps
    for a in ([3.0, 0.0], [1.0, 2.0]):
        (model.weight * torch.tensor([a])).sum().backward()
        probe.after_micro_step()
    ns = NoiseScale(ema=0.0)
    # micro-batch 4, global batch 8: tr = (7 - 5) / (1/4 - 1/8) = 16; |G|^2 = (8*5 - 4*7) / 4 = 3
    out = noise_metrics(ns, {}, probe, micro=4, global_batch=8, applied=True)
    assert out == {"noise/b_simple": pytest.approx(16.0 / 3.0)}
    assert (ns.trace_sigma, ns.g2) == pytest.approx((16.0, 3.0))


@pytest.fixture
def world_one():
    from dist_opt.dist.env import detect
    from dist_opt.dist.group import destroy_process_group, init_process_group

    init_process_group(detect({}), "gloo", 60)
    yield
    destroy_process_group()


def test_world_one_accumulation_logs_b_simple_of_the_micro_batches(world_one, tmp_path):
    import itertools

    import torch

    from dist_opt.config import load_config
    from dist_opt.train import Trainer

    over = [
        "task.name=synthetic",
        "task.kind=regression",
        "task.dim=8",
        "data.global_batch=32",
        "data.micro_batch=8",
        "train.steps=3",
        "train.progress=false",
        "tracking.wandb.mode=disabled",
        f"run.out_dir={tmp_path}",
    ]
    # off by default (tracking.noise_scale alone is the multi-rank estimate)
    assert "noise/b_simple" not in Trainer(load_config(None, over), torch.device("cpu")).train_step()
    tr = Trainer(load_config(None, [*over, "tracking.noise_scale_micro=true"]), torch.device("cpu"))
    assert tr.accum == 4
    # reference: the gradient of each of step 1's four micro-batches, computed directly
    params = [p for p in tr.model.parameters() if p.requires_grad]
    micro = []
    for batch in itertools.islice(tr.task.train_batches(tr._index_batches(0)), tr.accum):
        g = torch.autograd.grad(tr.task.loss(tr.model, batch), params)
        micro.append(torch.cat([x.reshape(-1) for x in g]).double())
    local = sum(float(g.square().sum()) for g in micro) / 4
    big = float((sum(micro) / 4).square().sum())
    trace, g2 = NoiseScale.estimates(local, big, 8, 32)
    m = tr.train_step()
    assert m["noise/b_simple"] == pytest.approx(trace / g2, rel=1e-6)  # bias-corrected EMA: step 1's value
    for _ in range(2):
        assert math.isfinite(tr.train_step()["noise/b_simple"])
