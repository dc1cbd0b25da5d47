"""bf16 parameters: the model's floating-point inputs are cast to the parameter dtype."""

from __future__ import annotations

import torch
from torch import nn

from dist_opt.config.precision import PrecisionConfig
from dist_opt.engine.precision import autocast, cast_params


def test_bf16_params_with_a_first_layernorm_take_fp32_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    ref = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4))
    ref.load_state_dict(model.state_dict())
    p = PrecisionConfig(compute="bf16", params="bf16")
    cast_params(model, p)
    assert model[0].weight.dtype == torch.bfloat16
    x = torch.randn(5, 8)  # fp32, as a DataLoader gives it
    with autocast(p, torch.device("cpu")):
        out = model(x)
    # the same as running the bf16 model on an input the user cast by hand
    ref = cast_params(ref, PrecisionConfig(compute="bf16", params="bf16"))
    with autocast(p, torch.device("cpu")):
        expected = ref(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_input_cast_leaves_integer_tensors_and_nesting_intact() -> None:
    seen: dict[str, torch.Tensor] = {}

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(
            self, pair: tuple[torch.Tensor, torch.Tensor], extra: dict[str, torch.Tensor]
        ) -> torch.Tensor:
            seen["x"], seen["ids"], seen["mask"] = pair[0], pair[1], extra["mask"]
            return self.w.sum()

    model = cast_params(Probe(), PrecisionConfig(compute="bf16", params="bf16"))
    model((torch.randn(2), torch.arange(3)), extra={"mask": torch.zeros(2)})
    assert seen["x"].dtype == torch.bfloat16
    assert seen["ids"].dtype == torch.int64
    assert seen["mask"].dtype == torch.bfloat16


def test_fp32_params_register_no_input_cast() -> None:
    model = cast_params(nn.Linear(2, 2), PrecisionConfig(compute="bf16", params="fp32"))
    assert not model._forward_pre_hooks
