"""DatasetTask: a map-style Dataset read through a DataLoader gives the sampler's global batches
exactly (any worker count, world size, accumulation, and after a restart), a deterministic model on
every rank, the default and custom losses/eval sums, and one-line errors for bad input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from dist_opt.config.schema import DataConfig
from dist_opt.data.sampler import GlobalBatchSampler
from dist_opt.tasks import cross_entropy_sums
from dist_opt.tasks.dataset import DatasetTask
from dist_opt.tasks.samples import SampleError

N, DIM, CLASSES = 96, 5, 3


def data(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, DIM, generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def linear() -> nn.Module:
    return nn.Linear(DIM, CLASSES)


def make(workers: int = 0, seed: int = 0, **kw) -> DatasetTask:
    task = DatasetTask(linear, data(), data(40, seed=1), **kw)
    task.configure_loader(
        DataConfig(
            num_workers=workers, persistent_workers=workers > 0, prefetch_factor=3 if workers else None
        ),
        seed,
    )
    return task


def micro_indices(sampler: GlobalBatchSampler, steps: range, rank: int, world: int, micro: int, accum: int):
    """The index tensors one rank reads, in the trainer's order: step t, micro-steps k = 0..accum-1."""
    for t in steps:
        idx = sampler.global_indices(t)
        for k in range(accum):
            yield GlobalBatchSampler.split(idx, rank, world, micro, k)


def assert_batches_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert isinstance(x, tuple) and len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_train_batches_equal_train_batch_with_and_without_workers(workers):
    task = make(workers)
    sampler = GlobalBatchSampler(task.train_size, 16, seed=3)
    stream = list(micro_indices(sampler, range(8), rank=1, world=2, micro=4, accum=2))  # crosses an epoch end
    got = list(task.train_batches(iter(stream)))
    assert_batches_equal(got, [task.train_batch(idx) for idx in stream])
    x, y = data()[:]
    assert torch.equal(got[5][0], x[stream[5]]) and torch.equal(got[5][1], y[stream[5]])


@pytest.mark.timeout(120)
def test_every_world_size_and_accumulation_reads_the_same_global_batches():
    task = make(workers=2)
    sampler = GlobalBatchSampler(task.train_size, 24, seed=0)

    def global_batches(world: int, accum: int) -> list[torch.Tensor]:
        micro = 24 // (world * accum)
        per_rank = [
            list(task.train_batches(micro_indices(sampler, range(6), r, world, micro, accum)))
            for r in range(world)
        ]
        out = []
        for t in range(6):  # reassemble by position: micro-step k of rank r holds rows (k*W + r)*m ...
            rows = [per_rank[r][t * accum + k][0] for k in range(accum) for r in range(world)]
            out.append(torch.cat(rows))
        return out

    reference = global_batches(1, 1)
    for world, accum in ((1, 4), (2, 3), (3, 2), (4, 1)):
        for a, b in zip(reference, global_batches(world, accum), strict=True):
            assert torch.equal(a, b), (world, accum)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_restarted_stream_continues_exactly(workers):
    """Split the index stream at step k and start a new task (as a resumed run does): the batches
    after k are those of the uninterrupted run."""
    sampler = GlobalBatchSampler(N, 16, seed=7)
    whole = list(make(workers).train_batches(micro_indices(sampler, range(10), 0, 2, 4, 2)))
    for k in (1, 5, 6):  # 6 steps per epoch: 6 resumes at an epoch boundary
        first = list(make(workers).train_batches(micro_indices(sampler, range(k), 0, 2, 4, 2)))
        rest = list(make(workers).train_batches(micro_indices(sampler, range(k, 10), 0, 2, 4, 2)))
        assert_batches_equal(first + rest, whole)


@pytest.mark.timeout(120)
def test_persistent_workers_serve_a_new_stream_on_the_next_call():
    task = make(workers=2)
    sampler = GlobalBatchSampler(N, 8, seed=1)
    a = list(micro_indices(sampler, range(3), 0, 1, 8, 1))
    b = list(micro_indices(sampler, range(3, 9), 0, 1, 8, 1))
    assert_batches_equal(list(task.train_batches(iter(a))), [task.train_batch(i) for i in a])
    assert_batches_equal(list(task.train_batches(iter(b))), [task.train_batch(i) for i in b])


class NoisyDataset(Dataset):
    """Samples drawn from the RNGs of the reading process (not index-pure): shows worker seeding."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int):
        return torch.tensor([torch.rand(()).item(), random.random(), np.random.rand()]), i % 2


@pytest.mark.timeout(120)
def test_loader_workers_are_seeded_from_the_run_seed():
    def read(seed: int) -> list:
        task = DatasetTask(linear, NoisyDataset())
        task.configure_loader(DataConfig(num_workers=2), seed)
        return list(task.train_batches(torch.arange(64).reshape(8, 8)))

    a, b, c = read(0), read(0), read(1)
    assert_batches_equal(a, b)
    assert not torch.equal(a[0][0], c[0][0])
    assert len({float(v) for v in a[0][0][:, 1]}) > 1  # python's random differs per sample, seeded per worker


def test_model_is_the_same_on_every_rank_and_leaves_the_global_rng_alone():
    def unseeded() -> nn.Module:  # uses the global RNG, as most user code does
        return nn.Sequential(nn.Linear(DIM, 8), nn.ReLU(), nn.Linear(8, CLASSES))

    task = DatasetTask(unseeded, data())
    task.configure_loader(DataConfig(), seed=4)
    states = []
    for rank in range(3):  # the trainer seeds the global RNG per rank before building the model
        torch.manual_seed(1000 * 4 + rank)
        before = torch.random.get_rng_state()
        states.append(task.build_model().state_dict())
        assert torch.equal(before, torch.random.get_rng_state())
    for s in states[1:]:
        assert all(torch.equal(s[k], states[0][k]) for k in s)
    other = DatasetTask(unseeded, data())
    other.configure_loader(DataConfig(), seed=5)
    assert not torch.equal(other.build_model().state_dict()["0.weight"], states[0]["0.weight"])
    explicit = DatasetTask(unseeded, data(), seed=4)  # an explicit seed wins over the run seed
    explicit.configure_loader(DataConfig(), seed=9)
    assert torch.equal(explicit.build_model().state_dict()["0.weight"], states[0]["0.weight"])


def test_default_loss_and_eval_sums_are_cross_entropy_with_accuracy():
    task = make()
    model = task.build_model()
    batch = task.train_batch(torch.tensor([3, 1, 4, 1, 5]))
    x, y = batch
    assert torch.allclose(task.loss(model, batch), F.cross_entropy(model(x), y))
    ev = task.eval_batch(torch.arange(40))
    model.train()
    sums = task.eval_sums(model, ev)
    assert model.training
    with torch.no_grad():
        assert sums == pytest.approx(cross_entropy_sums(model(ev[0]), ev[1]))
    assert task.has_accuracy and sums["count"] == 40


def test_custom_loss_metrics_and_several_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(DIM, 1), nn.Linear(2, 1)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return (self.a(x) + self.b(z)).squeeze(-1)

    g = torch.Generator().manual_seed(0)
    x, z, y = torch.randn(30, DIM, generator=g), torch.randn(30, 2, generator=g), torch.randn(30, generator=g)
    ds = TensorDataset(x, z, y)
    task = DatasetTask(TwoInputs, ds, ds, loss_fn=nn.MSELoss())
    model = task.build_model()
    assert not task.has_accuracy
    batch = task.train_batch(torch.arange(30))
    assert len(batch) == 3
    assert torch.allclose(task.loss(model, batch), F.mse_loss(model(x, z), y))
    sums = task.eval_sums(model, batch)
    assert sums["count"] == 30 and sums["loss_sum"] == pytest.approx(
        30 * F.mse_loss(model(x, z), y).item(), rel=1e-5
    )

    def abs_sums(out, target):
        return {"loss_sum": (out - target).abs().sum(), "count": len(target)}

    task = DatasetTask(TwoInputs, ds, ds, loss_fn=nn.L1Loss(), metrics_fn=abs_sums)
    sums = task.eval_sums(model, batch)
    assert sums["loss_sum"] == pytest.approx((model(x, z) - y).abs().sum().item(), rel=1e-5)
    assert isinstance(sums["count"], float)


def test_sequence_outputs_use_per_token_cross_entropy():
    class Tokens(Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int):
            seq = (torch.arange(7) + i) % 11
            return seq[:-1], seq[1:]

    task = DatasetTask(lambda: nn.Embedding(11, 11), Tokens(), Tokens(), tokens_per_sample=6)
    model = task.build_model()
    x, y = task.train_batch(torch.arange(4))
    logits = model(x)
    assert torch.allclose(task.loss(model, (x, y)), F.cross_entropy(logits.reshape(-1, 11), y.reshape(-1)))
    assert task.eval_sums(model, (x, y))["count"] == 24 and task.tokens_per_sample == 6


def test_class_scores_in_dim_1_follow_torch_layout():
    class Pixels(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int):
            return torch.full((1, 3, 3), float(i)), (torch.arange(9).reshape(3, 3) + i) % 4

    task = DatasetTask(lambda: nn.Conv2d(1, 4, 1), Pixels(), Pixels())
    model = task.build_model()
    x, y = task.train_batch(torch.arange(8))
    assert torch.allclose(task.loss(model, (x, y)), F.cross_entropy(model(x), y))
    sums = task.eval_sums(model, (x, y))
    assert sums["count"] == 72 and sums["loss_sum"] == pytest.approx(
        F.cross_entropy(model(x), y, reduction="sum").item(), rel=1e-5
    )
    from dist_opt.tasks import DatasetTask as exported

    assert exported is DatasetTask


def test_collate_fn_pads_samples_of_different_lengths():
    class Ragged(Dataset):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.ones(i % 4 + 1), i % 2

    def pad(samples):
        xs = nn.utils.rnn.pad_sequence([s[0] for s in samples], batch_first=True)
        return F.pad(xs, (0, 4 - xs.shape[1])), torch.tensor([s[1] for s in samples])

    task = DatasetTask(lambda: nn.Linear(4, 2), Ragged(), collate_fn=pad)
    x, y = task.train_batch(torch.arange(6))
    assert x.shape == (6, 4) and x.sum() == sum(i % 4 + 1 for i in range(6))
    assert_batches_equal(list(task.train_batches([torch.arange(6)])), [(x, y)])
    with pytest.raises(SampleError, match=r"^train sample 1: element 0: shape \(2,\) differs from \(1,\)"):
        DatasetTask(lambda: nn.Linear(4, 2), Ragged()).train_batch(torch.arange(3))


def test_without_eval_data_the_eval_set_is_empty():
    task = DatasetTask(linear, data())
    assert task.train_size == N and task.eval_size == 0
    with pytest.raises(IndexError):
        task.eval_batch(torch.tensor([0]))


# -- bad input: one line naming what is wrong -------------------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(DIM), 0


class Items(Dataset):
    def __init__(self, make_item) -> None:
        self.make_item = make_item

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        return self.make_item(i)


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


def test_an_iterable_dataset_is_refused_with_the_reason_and_the_fix():
    with pytest.raises(TypeError) as e:
        DatasetTask(linear, Stream())
    text = one_line(e)
    assert (
        "IterableDataset" in text and "by index" in text and "resumes exactly" in text and "map-style" in text
    )


@pytest.mark.parametrize(
    "item, message",
    [
        (lambda i: torch.zeros(DIM), r"train sample 0: expected an \(input, target\) tuple, got a Tensor"),
        (lambda i: (object(), 1), r"train sample 0: element 0 is a object, which cannot be batched"),
        (lambda i: (torch.zeros(DIM),), r"train sample 0: expected an \(input, target\) tuple"),
    ],
)
def test_a_bad_first_sample_is_named_at_construction(item, message):
    with pytest.raises(SampleError, match=message) as e:
        DatasetTask(linear, Items(item))
    one_line(e)


def test_other_bad_inputs():
    with pytest.raises(SampleError, match=r"eval sample 0 has 3 elements but train sample 0 has 2"):
        DatasetTask(linear, data(), Items(lambda i: (torch.zeros(DIM), 0, 0)))
    with pytest.raises(ValueError, match=r"train data is empty"):
        DatasetTask(linear, data(0))
    with pytest.raises(TypeError, match="model_fn must be a function"):
        DatasetTask(linear(), data())
    with pytest.raises(TypeError, match="returned a Tensor, not an nn.Module"):
        DatasetTask(lambda: torch.zeros(3), data()).build_model()
    with pytest.raises(IndexError, match=r"train index out of range: \[0, 96\]"):
        make().train_batch(torch.tensor([0, 96]))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_of_the_wrong_shape_is_named_when_read(workers):
    bad = Items(lambda i: (torch.zeros(DIM + (i == 7)), 0))
    task = DatasetTask(linear, bad)
    task.configure_loader(DataConfig(num_workers=workers), 0)
    expected = r"^train sample 7: element 0: shape \(6,\) differs from \(5,\) \(in train sample 2\)"
    with pytest.raises(SampleError, match=expected) as e:
        task.train_batch(torch.tensor([2, 3, 7]))
    one_line(e)
    stream = [torch.tensor([0, 1]), torch.tensor([2, 3, 7])]
    batches = task.train_batches(stream)
    assert torch.equal(next(batches)[0], torch.zeros(2, DIM))
    with pytest.raises(SampleError, match=expected) as e:
        next(batches)
    one_line(e)


def test_an_error_inside_the_dataset_keeps_its_traceback_and_names_the_sample():
    def broken(i: int):
        if i == 5:
            raise KeyError("no such file")
        return torch.zeros(DIM), 0

    task = DatasetTask(linear, Items(broken))
    with pytest.raises(KeyError) as e:
        task.train_batch(torch.tensor([4, 5]))
    if hasattr(e.value, "__notes__"):
        assert "(while reading train sample 5)" in e.value.__notes__


def test_loader_keys_in_the_config():
    from dist_opt.config import ConfigError, load_config

    d = load_config(
        None,
        [
            "data.num_workers=2",
            "data.prefetch_factor=4",
            "data.persistent_workers=true",
            "data.pin_memory=true",
        ],
    ).data
    assert (d.num_workers, d.prefetch_factor, d.persistent_workers, d.pin_memory) == (2, 4, True, True)
    assert load_config(None).data.num_workers == 0
    for key in ("prefetch_factor=2", "persistent_workers=true"):
        with pytest.raises(ConfigError, match=rf"data\.{key.split('=')[0]} needs data\.num_workers > 0"):
            load_config(None, [f"data.{key}"])


@pytest.mark.timeout(120)
def test_pin_memory_without_an_accelerator_reads_the_same_batches(recwarn):
    task = DatasetTask(linear, data())
    task.configure_loader(DataConfig(num_workers=1, pin_memory=True), 0)
    stream = [torch.arange(8), torch.arange(8, 16)]
    assert_batches_equal(list(task.train_batches(stream)), [task.train_batch(i) for i in stream])
    assert not [w for w in recwarn if "pin_memory" in str(w.message)]
