"""LR schedules vs torch.optim.lr_scheduler and closed forms; warmup; scale rules; resume; CLI."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from dist_opt.config.loader import ConfigError
from dist_opt.config.schema import Config
from dist_opt.schedule_cli import main as schedule_main
from dist_opt.schedule_cli import plot_lr, table_steps
from dist_opt.schedules import build_schedule, lr_trace, scaled_lr

BASE = 0.1


def cfg_of(lr: float = BASE, global_batch: int = 256, steps: int = 50, **schedule) -> Config:
    return Config.model_validate(
        {
            "optimizer": {"name": "sgd", "lr": lr},
            "data": {"global_batch": global_batch, "micro_batch": global_batch},
            "train": {"steps": steps},
            "schedule": {"reference_batch": 256, **schedule},
        }
    )


def torch_per_step(make, n: int, base: float = BASE) -> list[float]:
    """lr used at steps 1..n by a torch scheduler stepped after every optimizer step."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def torch_per_epoch(make, epochs: int, base: float = BASE) -> list[float]:
    """lr of each epoch 0..epochs-1 of a torch scheduler stepped at every epoch end."""
    return torch_per_step(make, epochs, base)


# --- each schedule vs its torch counterpart / closed form, at every step ------------------------


def test_constant():
    assert lr_trace(cfg_of(name="constant"), None, 30) == [BASE] * 30


def test_step_per_step_equals_steplr():
    got = lr_trace(cfg_of(name="step", step_size=7, gamma=0.5, per_step=True), None, 40)
    assert got == torch_per_step(lambda o: tls.StepLR(o, step_size=7, gamma=0.5), 40)


def test_step_per_epoch_equals_steplr_stepped_per_epoch():
    spe, epochs = 5, 9
    got = lr_trace(cfg_of(name="step", step_size=2, gamma=0.3), spe, spe * epochs)
    per_epoch = torch_per_epoch(lambda o: tls.StepLR(o, step_size=2, gamma=0.3), epochs)
    assert got == [per_epoch[(t - 1) // spe] for t in range(1, spe * epochs + 1)]


@pytest.mark.parametrize("per_step", [False, True])
def test_multistep_equals_multisteplr(per_step):
    milestones = [3, 5, 11]
    c = cfg_of(name="multistep", milestones=milestones, gamma=0.2, per_step=per_step)
    make = lambda o: tls.MultiStepLR(o, milestones=milestones, gamma=0.2)  # noqa: E731
    if per_step:
        assert lr_trace(c, None, 30) == torch_per_step(make, 30)
    else:
        spe = 3
        per_epoch = torch_per_epoch(make, 14)
        assert lr_trace(c, spe, 42) == [per_epoch[(t - 1) // spe] for t in range(1, 43)]


def test_cosine_equals_torch_and_closed_form():
    total, min_lr = 60, 0.01
    got = lr_trace(cfg_of(name="cosine", min_lr=min_lr), None, total)
    assert got == torch_per_step(lambda o: tls.CosineAnnealingLR(o, T_max=total, eta_min=min_lr), total)
    closed = [
        min_lr + (BASE - min_lr) * (1 + math.cos(math.pi * (t - 1) / total)) / 2 for t in range(1, total + 1)
    ]
    assert got == pytest.approx(closed, rel=1e-12, abs=1e-15)


def test_cosine_restarts_equals_torch():
    total = 100
    got = lr_trace(cfg_of(name="cosine_restarts", T_0=7, T_mult=2, min_lr=0.001), None, total)
    ref = torch_per_step(lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=7, T_mult=2, eta_min=0.001), total)
    assert got == ref
    # restarts at 1-based steps 8, 8+14=22, 22+28=50 return to the base lr
    assert [t for t in range(1, total + 1) if got[t - 1] == BASE] == [1, 8, 22, 50]


def test_polynomial_closed_form_and_torch():
    total, power, end = 40, 2.0, 0.004
    got = lr_trace(cfg_of(name="polynomial", power=power, min_lr=end), None, total)
    closed = [(BASE - end) * (1 - (t - 1) / total) ** power + end for t in range(1, total + 1)]
    assert got == pytest.approx(closed, rel=1e-12, abs=1e-15)
    got0 = lr_trace(cfg_of(name="polynomial", power=power, min_lr=0.0), None, total)
    ref0 = torch_per_step(lambda o: tls.PolynomialLR(o, total_iters=total, power=power), total)
    assert got0 == pytest.approx(ref0, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("d_model", [None, 64])
def test_noam_closed_form(d_model):
    warmup, total, lr = 10, 60, 2.0
    got = lr_trace(
        cfg_of(lr=lr, name="noam", warmup_steps=warmup, d_model=d_model, warmup_start_factor=0.5), None, total
    )
    d = 1.0 if d_model is None else d_model
    closed = [lr * d**-0.5 * min(t**-0.5, t * warmup**-1.5) for t in range(1, total + 1)]
    assert got == pytest.approx(closed, rel=1e-12)
    assert max(range(total), key=lambda i: got[i]) + 1 == warmup  # peak at t = warmup
    assert got[warmup - 1] == pytest.approx(lr * d**-0.5 * warmup**-0.5, rel=1e-12)


def test_noam_without_warmup_is_inverse_sqrt():
    got = lr_trace(cfg_of(lr=1.0, name="noam", warmup_steps=0), None, 20)
    assert got == pytest.approx([t**-0.5 for t in range(1, 21)], rel=1e-12)


def test_plateau_equals_reduce_on_plateau():
    losses = [1.0, 0.9, 0.9, 0.95, 0.91, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    every, total = 5, 5 * len(losses)
    c = cfg_of(name="plateau", patience=2, gamma=0.5, threshold=0.01, min_lr=0.02)
    got = lr_trace(c, None, total, eval_every=every, eval_metric=lambda t: losses[t // every - 1])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    ref = tls.ReduceLROnPlateau(opt, factor=0.5, patience=2, threshold=0.01, min_lr=0.02)
    expected = []
    for t in range(1, total + 1):
        expected.append(opt.param_groups[0]["lr"])
        if t % every == 0:
            ref.step(losses[t // every - 1])
    assert got == expected
    assert min(got) == 0.02 and len(set(got)) == 4  # 0.1 -> 0.05 -> 0.025 -> floor 0.02


# --- composition, scaling, groups ---------------------------------------------------------------


def test_warmup_then_cosine_matches_linearlr_then_cosine():
    warmup, total, start = 8, 48, 0.25
    got = lr_trace(cfg_of(name="cosine", warmup_steps=warmup, warmup_start_factor=start), None, total)
    lin = torch_per_step(lambda o: tls.LinearLR(o, start_factor=start, total_iters=warmup), warmup)
    cos = torch_per_step(lambda o: tls.CosineAnnealingLR(o, T_max=total - warmup), total - warmup)
    assert got[:warmup] == pytest.approx(lin, rel=1e-12)
    assert got[warmup:] == cos  # the main clock starts after warmup


def test_warmup_from_zero_then_polynomial_mlperf_form():
    warmup, total, power = 5, 30, 2.0
    got = lr_trace(cfg_of(name="polynomial", warmup_steps=warmup, power=power), None, total)
    # MLPerf LARS: global_step g (0-based); warmup base*g/W; then base*(1-(g-W)/(total-W))^2
    ref = [
        BASE * g / warmup if g < warmup else BASE * (1 - (g - warmup) / (total - warmup)) ** power
        for g in range(total)
    ]
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert got[0] == 0.0


@pytest.mark.parametrize("name", ["constant", "step", "cosine_restarts"])
def test_warmup_composes_with_any_schedule(name):
    warmup, total = 6, 40
    extra = {"per_step": True, "step_size": 4} if name == "step" else {"T_0": 9}
    with_w = lr_trace(cfg_of(name=name, warmup_steps=warmup, warmup_start_factor=0.1, **extra), None, total)
    without = lr_trace(cfg_of(name=name, **extra), None, total)
    assert with_w[:warmup] == pytest.approx(
        [BASE * (0.1 + 0.9 * k / warmup) for k in range(warmup)], rel=1e-12
    )
    assert with_w[warmup:] == without[: total - warmup]


def test_warmup_multiplies_epoch_decay_within_warmup():
    # epoch-clocked step decay counts run epochs; an epoch ending inside warmup decays under the ramp
    spe, warmup = 4, 10
    got = lr_trace(cfg_of(name="step", step_size=1, gamma=0.5, warmup_steps=warmup), spe, 16)
    expected = [BASE * 0.5 ** ((t - 1) // spe) * min(1.0, (t - 1) / warmup) for t in range(1, 17)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_plateau_ignores_evals_during_warmup():
    c = cfg_of(name="plateau", patience=0, gamma=0.5, warmup_steps=10)
    got = lr_trace(c, None, 20, eval_every=2, eval_metric=lambda t: 1.0)  # never improves
    # evals at steps 2..8 fall in warmup (ignored); first counted eval at 10 sets the best,
    # 12 is the first bad one -> step 13 halves (patience 0), 14 -> step 15 halves again, ...
    assert got[10:12] == [BASE, BASE]
    assert got[12] == BASE / 2 and got[14] == BASE / 4
    assert got[:10] == pytest.approx([BASE * k / 10 for k in range(10)], rel=1e-12)  # warmup undisturbed


@pytest.mark.parametrize("rule,factor", [("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8.0))])
def test_scale_rules(rule, factor):
    small = cfg_of(global_batch=128, scale_rule=rule, name="cosine", warmup_steps=3)
    big = cfg_of(global_batch=8 * 128, scale_rule=rule, name="cosine", warmup_steps=3)
    assert scaled_lr(big, 1024) / scaled_lr(small, 128) == pytest.approx(factor, rel=1e-12)
    assert lr_trace(big, None, 20) == pytest.approx(
        [factor * x for x in lr_trace(small, None, 20)], rel=1e-12
    )
    assert scaled_lr(cfg_of(scale_rule=rule), 256) == BASE  # the reference batch keeps optimizer.lr


def test_lr_mult_groups_follow_their_own_base():
    c = cfg_of(name="cosine", min_lr=0.001, warmup_steps=4, warmup_start_factor=0.5)
    p1, p2 = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr_mult": 0.2}], lr=1.0)
    sched = build_schedule(c, opt, None, 30)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([BASE, 0.2 * BASE])
    seen = [[], []]
    for _ in range(30):
        for i, g in enumerate(opt.param_groups):
            seen[i].append(g["lr"])
        assert sched.lrs == [g["lr"] for g in opt.param_groups]
        opt.step()
        sched.step()
    for i, base in enumerate([BASE, 0.2 * BASE]):
        lin = torch_per_step(lambda o: tls.LinearLR(o, start_factor=0.5, total_iters=4), 4, base)
        cos = torch_per_step(lambda o: tls.CosineAnnealingLR(o, T_max=26, eta_min=0.001), 26, base)
        assert seen[i] == pytest.approx(lin + cos, rel=1e-12)


def test_optimizer_step_uses_scheduled_lr():
    """SGD on a parameter with gradient 1: after t steps p = -sum of the lrs of steps 1..t."""
    c = cfg_of(name="cosine_restarts", T_0=5, warmup_steps=3)
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=123.0)
    sched = build_schedule(c, opt, None, 20)
    for _ in range(20):
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert p.item() == pytest.approx(-sum(lr_trace(c, None, 20)), rel=1e-6)


def test_override_composes_with_the_schedule_which_keeps_its_clock():
    """The schedule stays the only writer of the lr: an override maps its lrs at every write, its own
    lrs (and clock) go on underneath, and removing the override gives them back unchanged."""
    c = cfg_of(name="cosine", warmup_steps=3, min_lr=0.001)
    opt = torch.optim.SGD(
        [
            {"params": [torch.zeros(1, requires_grad=True)]},
            {"params": [torch.zeros(1, requires_grad=True)], "lr_mult": 2.0},
        ],
        lr=1.0,
    )
    sched = build_schedule(c, opt, None, 20)
    own = lr_trace(c, None, 20)
    written = []
    for t in range(1, 21):
        if t == 6:
            sched.set_override(lambda lrs: [0.5 * x + 1.0 for x in lrs])
        if t == 15:
            sched.set_override(None)
        written.append(opt.param_groups[0]["lr"])
        assert sched.lrs[0] == own[t - 1]  # the schedule's own value whatever is written
        sched.step()
    assert written[:5] == own[:5] and written[14:] == own[14:]
    assert written[5:14] == [0.5 * x + 1.0 for x in own[5:14]]
    state = {"factor": 1.0}
    sched.set_override(lambda lrs: [state["factor"] * x for x in lrs])
    state["factor"] = 3.0
    assert opt.param_groups[1]["lr"] == sched.lrs[1]  # written when the override was set
    sched.refresh()  # the override's input changed: rewrite
    assert [g["lr"] for g in opt.param_groups] == [3.0 * x for x in sched.lrs]


# --- exact resume ----------------------------------------------------------------------------

RESUME_CASES = {
    "cosine": dict(name="cosine", warmup_steps=5, min_lr=0.001),
    "cosine_restarts": dict(name="cosine_restarts", T_0=4, T_mult=2, warmup_steps=3),
    "polynomial": dict(name="polynomial", warmup_steps=4, min_lr=0.002),
    "noam": dict(name="noam", warmup_steps=6, d_model=16),
    "step": dict(name="step", step_size=2, gamma=0.5, warmup_steps=2),
    "multistep": dict(name="multistep", milestones=[1, 3, 5], gamma=0.5),
    "plateau": dict(name="plateau", patience=1, gamma=0.5, warmup_steps=3),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_state_dict_round_trip_mid_run(case):
    c, total, spe, cut = cfg_of(**RESUME_CASES[case]), 40, 6, 17
    losses = [1.0, 0.8, 0.85, 0.9, 0.95, 0.7, 0.75, 0.8, 0.82, 0.9]

    def make():
        opt = torch.optim.SGD(
            [
                {"params": [torch.zeros(1, requires_grad=True)]},
                {"params": [torch.zeros(1, requires_grad=True)], "lr_mult": 3.0},
            ],
            lr=1.0,
        )
        return opt, build_schedule(c, opt, spe, total)

    def run(sched, opt, steps, out):
        for t in steps:
            out.append([g["lr"] for g in opt.param_groups])
            sched.step()
            if t % 4 == 0:
                sched.on_eval(losses[(t // 4) % len(losses)])
            if t % spe == 0:
                sched.epoch_end()

    opt_a, a = make()
    straight: list = []
    run(a, opt_a, range(1, total + 1), straight)

    opt_b, b = make()
    resumed: list = []
    run(b, opt_b, range(1, cut + 1), resumed)
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)  # must survive a real save/load with weights_only
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    run(b, opt_b, range(cut + 1, cut + 4), [])  # the old object keeps going; must not affect sd
    opt_c, c_sched = make()
    c_sched.load_state_dict(sd)
    assert [g["lr"] for g in opt_c.param_groups] == straight[cut]
    run(c_sched, opt_c, range(cut + 1, total + 1), resumed)
    assert resumed == straight
    assert len({tuple(x) for x in straight}) > 3  # the case really changes lr


def test_load_state_dict_rejects_other_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sd = build_schedule(cfg_of(name="cosine"), opt, None, 10).state_dict()
    other = build_schedule(cfg_of(name="polynomial"), opt, None, 10)
    with pytest.raises(ValueError, match="schedule.name"):
        other.load_state_dict(sd)


# --- bad settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,spe,field",
    [
        (dict(name="step"), None, "schedule.per_step"),
        (dict(name="multistep", per_step=True), None, "schedule.milestones"),
        (dict(name="plateau", gamma=1.5), None, "schedule.gamma"),
        (dict(name="cosine", min_lr=1.0), None, "schedule.min_lr"),
    ],
)
def test_bad_settings_name_the_key(kw, spe, field):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ConfigError) as err:
        build_schedule(cfg_of(**kw), opt, spe, 10)
    assert field in str(err.value)


# --- CLI ------------------------------------------------------------------------------------


def write_cfg(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE_YAML = """
optimizer: {name: lars, lr: 0.2}
data: {global_batch: 1024, micro_batch: 64}
train: {steps: 200}
schedule: {name: polynomial, warmup_steps: 20, scale_rule: linear, reference_batch: 256}
"""


def test_cli_table_and_png(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, BASE_YAML)
    png = tmp_path / "lr.png"
    rc = schedule_main([str(cfg_path), "schedule.power=1", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c = cfg_of(lr=0.2, global_batch=1024, name="polynomial", warmup_steps=20, scale_rule="linear", power=1.0)
    trace = lr_trace(c, None, 200)
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == table_steps(200, 20)
    assert 18 <= len(rows) <= 24
    for step, lr in rows:
        assert float(lr) == pytest.approx(trace[int(step) - 1], rel=1e-5, abs=1e-12)
    assert max(trace) == pytest.approx(0.8)  # 0.2 x 1024/256 reached at the warmup end


def test_plot_lr_draws_the_trace(tmp_path):
    trace = lr_trace(cfg_of(name="cosine_restarts", T_0=10, warmup_steps=5), None, 60)
    fig = plot_lr(trace, tmp_path / "x.png", "t")
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == list(range(1, 61))
    assert list(line.get_ydata()) == trace
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_epochs_with_steps_per_epoch(tmp_path, capsys):
    cfg_path = write_cfg(tmp_path, BASE_YAML.replace("train: {steps: 200}", "train: {epochs: 6}"))
    rc = schedule_main(
        [str(cfg_path), "schedule.name=step", "schedule.step_size=2", "--steps-per-epoch", "7"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "42 steps" in out and "7 steps/epoch" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["{missing}"], "file not found"),
        (["{cfg}", "schedule.nmae=cosine"], "schedule.nmae: unknown key"),
        (["{cfg}", "schedule.name=linear"], "schedule.name"),
        (["{cfg}", "schedule.name=plateau", "schedule.gamma=2"], "schedule.gamma"),
        (["{cfg}", "--plot", "{nodir}/lr.png"], "does not exist"),
        (["{cfg}", "--steps-per-epoch", "0"], "--steps-per-epoch"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, args, needle):
    cfg_path = write_cfg(tmp_path, BASE_YAML)
    subs = {
        "cfg": str(cfg_path),
        "missing": str(tmp_path / "nope.yaml"),
        "nodir": str(tmp_path / "no" / "dir"),
    }
    rc = schedule_main([a.format(**subs) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert not list(tmp_path.glob("**/*.png"))
