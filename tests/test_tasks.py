"""Built-in tasks: determinism, shapes, learnability, eval sums, data splits and the synthetic spectrum."""

from __future__ import annotations

import os
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_opt.config.schema import TaskConfig
from dist_opt.tasks import build_task, derive_seed
from dist_opt.tasks.digits import N_TEST, load_split, stratified_test_indices
from dist_opt.tasks.stdlib_lm import load_corpus, stdlib_files

TINY = {
    "digits": dict(name="digits", hidden=16),
    "digits_bn": dict(name="digits", hidden=16, batchnorm=True),
    "synthetic_cls": dict(name="synthetic", dim=8, hidden=16, classes=4, eval_size=300),
    "synthetic_reg": dict(name="synthetic", kind="regression", dim=8, condition_number=10.0, eval_size=300),
    "stdlib_lm": dict(name="stdlib_lm", seq_len=16, d_model=16, n_layers=1, n_heads=2, max_files=30),
}


def make(key: str, seed: int = 0, **over: object):
    return build_task(TaskConfig(**{**TINY[key], **over}), seed)


def some_indices(task, n: int = 50, seed: int = 1) -> torch.Tensor:
    """Shuffled, non-contiguous int64 indices (with a repeat) valid for the task's training set."""
    g = torch.Generator().manual_seed(seed)
    bound = task.train_size if task.train_size is not None else 10**9
    idx = torch.randint(0, bound, (n,), generator=g, dtype=torch.int64)
    idx[-1] = idx[0]
    return idx


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unknown_task_name_is_an_error_naming_the_key():
    cfg = TaskConfig.model_construct(**{**TaskConfig().model_dump(), "name": "mnist"})
    with pytest.raises(ValueError, match=r"task\.name.*mnist"):
        build_task(cfg, 0)


def test_derive_seed_is_stable_and_separates_keys():
    assert derive_seed(3, "a", 1) == derive_seed(3, "a", 1)
    assert (
        len({derive_seed(3, "a", 1), derive_seed(3, "a", 2), derive_seed(4, "a", 1), derive_seed(3, "b", 1)})
        == 4
    )
    assert 0 <= derive_seed(2**40, "x") < 2**63


@pytest.mark.parametrize("key", list(TINY))
def test_model_init_is_bitwise_deterministic_and_leaves_global_rng_alone(key):
    task = make(key, seed=5)
    rng_before = torch.random.get_rng_state()
    a, b = state(task.build_model()), state(task.build_model())
    assert torch.equal(rng_before, torch.random.get_rng_state())
    c = state(make(key, seed=5).build_model())
    d = state(make(key, seed=6).build_model())
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
        assert torch.isfinite(a[k].float()).all(), k
    assert any(not torch.equal(a[k], d[k]) for k in a if a[k].dim() >= 2)


@pytest.mark.parametrize("key", list(TINY))
def test_batches_are_pure_functions_of_indices(key):
    task = make(key, seed=3)
    idx = some_indices(task)
    full = task.train_batch(idx)
    assert isinstance(full, tuple) and len(full) == 2
    for k in (1, 17, len(idx) - 1):
        parts = [task.train_batch(idx[:k]), task.train_batch(idx[k:])]
        for t, (p, q) in enumerate(zip(*parts, strict=True)):
            assert torch.equal(full[t], torch.cat([p, q])), (k, t)
    # the repeated index gives the repeated row; a fresh instance gives the same rows
    assert all(torch.equal(t[0], t[-1]) for t in full)
    fresh = make(key, seed=3).train_batch(idx.flip(0))
    for t, f in zip(full, fresh, strict=True):
        assert torch.equal(t, f.flip(0))
    eval_idx = torch.arange(task.eval_size).flip(0)[:40]
    e1, e2 = task.eval_batch(eval_idx), make(key, seed=3).eval_batch(eval_idx.flip(0))
    for t, f in zip(e1, e2, strict=True):
        assert torch.equal(t, f.flip(0))


@pytest.mark.parametrize("key", list(TINY))
def test_out_of_range_indices_are_rejected(key):
    task = make(key)
    with pytest.raises(IndexError):
        task.eval_batch(torch.tensor([task.eval_size]))
    with pytest.raises(IndexError):
        task.train_batch(torch.tensor([-1]))
    if task.train_size is not None:
        with pytest.raises(IndexError):
            task.train_batch(torch.tensor([task.train_size]))


@pytest.mark.parametrize(
    "key, x_shape, x_dtype, y_shape, y_dtype",
    [
        ("digits", (7, 64), torch.float32, (7,), torch.int64),
        ("synthetic_cls", (7, 8), torch.float32, (7,), torch.int64),
        ("synthetic_reg", (7, 8), torch.float32, (7,), torch.float32),
        ("stdlib_lm", (7, 16), torch.int64, (7, 16), torch.int64),
    ],
)
def test_shapes_dtypes_and_model_outputs(key, x_shape, x_dtype, y_shape, y_dtype):
    task = make(key)
    x, y = task.train_batch(torch.arange(7))
    assert (x.shape, x.dtype, y.shape, y.dtype) == (x_shape, x_dtype, y_shape, y_dtype)
    xe, ye = task.eval_batch(torch.arange(7))
    assert (xe.shape, xe.dtype, ye.shape, ye.dtype) == (x_shape, x_dtype, y_shape, y_dtype)
    out = task.build_model()(x)
    if key == "synthetic_reg":
        assert out.shape == (7,)
    elif key == "stdlib_lm":
        assert out.shape == (7, 16, 256)
    else:
        assert out.shape == (7, 10 if key == "digits" else 4)
    if y.dtype == torch.int64:
        assert int(y.min()) >= 0 and int(y.max()) < out.shape[-1]


def test_task_attributes():
    assert make("digits").has_accuracy and make("digits").tokens_per_sample == 1
    assert make("synthetic_cls").has_accuracy and make("synthetic_cls").train_size is None
    assert not make("synthetic_reg").has_accuracy
    lm = make("stdlib_lm")
    assert lm.has_accuracy and lm.tokens_per_sample == 16


@pytest.mark.parametrize("key", list(TINY))
def test_a_few_sgd_steps_lower_the_loss(key):
    task = make(key)
    model = task.build_model()
    batch = task.train_batch(torch.arange(64))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    with torch.no_grad():
        first = float(task.loss(model, batch))
    for _ in range(20):
        opt.zero_grad()
        loss = task.loss(model, batch)
        assert loss.dim() == 0 and loss.requires_grad
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(task.loss(model, batch))
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("key", list(TINY))
def test_eval_sums_match_the_mean_loss_and_a_direct_accuracy(key):
    task = make(key)
    model = task.build_model()
    if key == "digits_bn":  # give BatchNorm non-trivial running statistics first
        with torch.no_grad():
            model(task.train_batch(torch.arange(200))[0])
    model.eval()
    batch = task.eval_batch(torch.arange(37))
    with torch.no_grad():
        mean = float(task.loss(model, batch))
    model.train()
    before = state(model)
    sums = task.eval_sums(model, batch)
    assert model.training, "eval_sums must restore the training mode"
    for k, v in state(model).items():
        assert torch.equal(v, before[k]), f"eval_sums changed {k}"
    assert all(isinstance(v, float) for v in sums.values())
    x, y = batch
    expected_count = y.numel()  # samples, or tokens for the LM
    assert sums["count"] == expected_count
    assert sums["loss_sum"] / sums["count"] == pytest.approx(mean, rel=1e-5)
    if task.has_accuracy:
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(-1)
        assert sums["correct"] == float((pred == y).sum())
    else:
        assert "correct" not in sums


def test_eval_sums_use_batchnorm_running_statistics():
    task = make("digits_bn")
    model = task.build_model()
    with torch.no_grad():
        model(task.train_batch(torch.arange(300))[0])  # updates running stats (train mode)
    batch = task.eval_batch(torch.arange(20))
    x, y = batch
    model.eval()
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y, reduction="sum")
    model.train()
    assert task.eval_sums(model, batch)["loss_sum"] == pytest.approx(float(ref), rel=1e-6)


# ---- digits ------------------------------------------------------------------------------------


def test_digits_split_sizes_stratification_and_independence_from_seed():
    from sklearn.datasets import load_digits

    ref = load_digits()
    x_all = torch.as_tensor(ref.data, dtype=torch.float32) / 16
    y_all = torch.as_tensor(ref.target)
    a, b = make("digits", seed=0), make("digits", seed=99)
    assert (a.train_size, a.eval_size) == (1437, 360) == (len(a.x_train), N_TEST)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.x_train, b.x_train)
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0
    test = stratified_test_indices(y_all, N_TEST, 0)
    assert len(set(test.tolist())) == N_TEST
    train = sorted(set(range(len(y_all))) - set(test.tolist()))
    x_tr, y_tr, x_te, y_te = load_split()
    assert torch.equal(x_te, x_all[test.sort().values]) and torch.equal(y_te, y_all[test.sort().values])
    assert torch.equal(x_tr, x_all[train]) and torch.equal(y_tr, y_all[train])
    for c in range(10):  # stratified: each class's test share within one sample of 360/1797
        n_c = int((y_all == c).sum())
        assert abs(int((y_te == c).sum()) - n_c * N_TEST / len(y_all)) <= 1.0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.37])
def test_digits_label_noise_fraction_and_determinism(p):
    a = make("digits", seed=1, label_noise=p)
    changed = a.y_train != a.y_train_clean
    assert int(changed.sum()) == round(p * a.train_size)
    _, y = a.train_batch(torch.arange(a.train_size))
    assert torch.equal(y, a.y_train)
    assert torch.equal(a.eval_batch(torch.arange(a.eval_size))[1], make("digits").y_test)  # eval stays clean
    assert int(a.y_train.min()) >= 0 and int(a.y_train.max()) <= 9
    again, other = make("digits", seed=1, label_noise=p), make("digits", seed=2, label_noise=p)
    assert torch.equal(again.y_train, a.y_train)
    if p > 0:
        assert not torch.equal(other.y_train, a.y_train)


def test_digits_parameter_names_mark_batchnorm():
    names = [n for n, _ in make("digits_bn").build_model().named_parameters()]
    bn = [n for n in names if "bn" in n]
    assert len(bn) == 4 and all(n.endswith(("weight", "bias")) for n in bn)
    assert not any("bn" in n for n, _ in make("digits").build_model().named_parameters())


# ---- synthetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kappa", [1.0, 100.0])
def test_synthetic_input_covariance_has_the_condition_number(kappa):
    task = make("synthetic_reg", condition_number=kappa)
    x, _ = task.train_batch(torch.arange(1 << 16) + 12345)
    emp = torch.cov(x.double().T)
    eig = torch.linalg.eigvalsh(emp)
    assert float(eig.max() / eig.min()) == pytest.approx(kappa, rel=0.15)
    assert float(eig.max()) == pytest.approx(1.0, rel=0.05)
    ref = torch.linalg.eigvalsh(task.covariance)
    assert float(ref.max() / ref.min()) == pytest.approx(kappa, rel=1e-9)
    assert torch.allclose(emp, task.covariance, atol=0.03)
    # the rotation is not axis-aligned when kappa > 1
    if kappa > 1:
        off = task.covariance - torch.diag(torch.diagonal(task.covariance))
        assert float(off.abs().max()) > 0.05


def test_synthetic_regression_is_linear_in_x_with_the_configured_noise():
    noise = 0.3
    task = make("synthetic_reg", noise=noise, condition_number=50.0)
    x, y = task.train_batch(torch.arange(20000))
    design = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution
    resid = y.double() - (design @ coef).squeeze(1)
    assert float(resid.var()) == pytest.approx(noise**2, rel=0.05)
    assert float(y.double().var()) == pytest.approx(1 + noise**2, rel=0.1)


def test_synthetic_classification_noise_controls_label_flips():
    idx = torch.arange(5000)
    clean = make("synthetic_cls", noise=0.0).train_batch(idx)[1]
    noisy = make("synthetic_cls", noise=5.0).train_batch(idx)[1]
    slight = make("synthetic_cls", noise=0.05).train_batch(idx)[1]
    assert len(clean.unique()) >= 2
    flips_noisy = float((noisy != clean).float().mean())
    flips_slight = float((slight != clean).float().mean())
    assert flips_slight < 0.1 < 0.5 < flips_noisy


def test_synthetic_eval_stream_is_disjoint_from_train_and_stream_is_fast():
    task = make("synthetic_cls", eval_size=2048)
    xe, _ = task.eval_batch(torch.arange(2048))
    xt, _ = task.train_batch(torch.arange(2048))
    assert len(xe[:, 0].unique()) == 2048 and not torch.isin(xe[:, 0], xt[:, 0]).any()
    big = make("synthetic_cls", dim=32)
    start = 10**12
    times = []
    for k in range(11):  # median over calls on never-seen blocks (robust to a busy machine)
        t0 = time.perf_counter()
        big.train_batch(torch.arange(start + k * 4096, start + (k + 1) * 4096))
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    assert median < 0.05, f"{median * 1000:.1f} ms per 4096 fresh samples"


# ---- stdlib_lm ---------------------------------------------------------------------------------


def test_stdlib_corpus_is_split_by_file():
    root = sysconfig.get_paths()["stdlib"]
    corpus = load_corpus(30)
    files = stdlib_files(root)
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.split("/"))
    first = files[:30]
    assert set(corpus.train_files).isdisjoint(corpus.eval_files)
    assert sorted(corpus.train_files + corpus.eval_files) == sorted(first)
    assert list(corpus.eval_files) == [f for k, f in enumerate(first) if k % 10 == 9]
    expected = b"".join(Path(root, f).read_bytes() for f in corpus.train_files)
    assert bytes(corpus.train.numpy()) == expected
    held = b"".join(Path(root, f).read_bytes() for f in corpus.eval_files)
    assert bytes(corpus.eval.numpy()) == held
    assert load_corpus(30) is corpus  # cached per process
    assert all(os.path.isfile(os.path.join(root, f)) for f in first)


def test_stdlib_windows_follow_the_corpus():
    task = make("stdlib_lm")
    data = task.corpus.train
    assert task.train_size == (len(data) - 1) // 16
    idx = torch.tensor([0, 5, task.train_size - 1])
    x, y = task.train_batch(idx)
    for row, i in enumerate(idx.tolist()):
        window = data[i * 16 : i * 16 + 17].long()
        assert torch.equal(x[row], window[:-1]) and torch.equal(y[row], window[1:])
    assert task.eval_size == (len(task.corpus.eval) - 1) // 16


def test_stdlib_model_naming_for_weight_decay_exclusion():
    model = make("stdlib_lm", n_layers=2).build_model()
    names = dict(model.named_parameters())
    one_d = [n for n, p in names.items() if p.dim() == 1]
    assert one_d and all(("ln" in n) or n.endswith("bias") for n in one_d)
    assert all(n.endswith("bias") for n in one_d if "ln" not in n)
    assert not any("ln" in n or "bias" in n for n, p in names.items() if p.dim() >= 2)
    assert model.head.weight.data_ptr() != model.tok_emb.weight.data_ptr()  # untied


def test_stdlib_model_is_causal():
    task = make("stdlib_lm")
    model = task.build_model().eval()
    x, _ = task.train_batch(torch.arange(2))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(x2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
