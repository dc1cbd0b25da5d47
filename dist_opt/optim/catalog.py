"""The built-in optimizers, each declared once (see ``dist_opt.optim.spec``), and their config keys.

Defaults are the papers' / torch.optim's, never common textbook pseudo-code (see docs/algorithms.md): Adam betas
(0.9, 0.999), eps 1e-8, bias correction on; LAMB eps 1e-6 with v from g²; LARS with a global lr;
Shampoo (0.9, 1.0) where beta2 = 1 sums the statistics AdaGrad-style. The rule classes live in
``elementwise`` (torch.optim kernels), ``trust`` (LARS, LAMB) and ``shampoo``. Imports no torch.

``optimizer.nesterov`` is Shampoo's NAdam-style first moment. Nesterov SGD is its own name,
``optimizer.name=nesterov``; ``name=momentum`` with ``nesterov`` set is refused (a hint says to use the
name) rather than silently running plain momentum or quietly changing the name's meaning.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dist_opt.optim.spec import RuleSpec, declare_key, register_rule

PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Beta = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]

# -- keys, in the order of the config reference -----------------------------------------------------
declare_key("momentum", Beta, "Momentum factor (heavy-ball buffer; RMSProp's momentum buffer).")
declare_key("dampening", Unit, "SGD dampening (torch.optim.SGD).")
declare_key(
    "betas",
    tuple[Beta, Beta],
    "(beta1, beta2): decay of the first and second moment averages; shampoo's beta2 = 1 "
    "sums its statistics AdaGrad-style.",
)
declare_key("eps", PosFloat, "Epsilon added to the denominator.")
declare_key("alpha", Beta, "RMSProp smoothing constant.")
declare_key("centered", bool, "Centered RMSProp (divide by the variance estimate).")
declare_key("lr_decay", NonNegFloat, "Adagrad's lr decay: lr / (1 + (t - 1) lr_decay).")
declare_key("initial_accumulator_value", NonNegFloat, "Initial value of Adagrad's sum of squares.")
declare_key("amsgrad", bool, "AMSGrad (the running maximum of the second moment).")
declare_key(
    "bias_correction", bool, "Adam-type bias correction (Kingma & Ba). Turning it off is only an option."
)
declare_key("trust_coefficient", PosFloat, "Trust coefficient eta of LARS.")
declare_key(
    "lars_denominator",
    Literal["paper", "tf"],
    "Trust-ratio denominator: paper ||g|| + wd||p||, tf ||g + wd p|| (MLPerf reference).",
)
declare_key(
    "trust_clip",
    tuple[NonNegFloat, PosFloat],
    "Clamp phi(||p||) to [low, high], e.g. [0, 10]. None: phi(z) = z.",
)
declare_key(
    "max_preconditioner_dim", PosInt, "Split dims larger than this into blocks; merge small dims up to it."
)
declare_key(
    "precondition_frequency", PosInt, "Recompute root inverses every k steps (staggered across blocks)."
)
declare_key("start_preconditioning_step", PosInt, "Use the graft step before this step.")
declare_key("exponent_override", PosFloat, "Root exponent override (default 1/(2k) for order-k blocks).")
declare_key(
    "grafting",
    Literal["adam", "adagrad", "rmsprop", "sgd", "none"],
    "Grafting method (per-block norm of the graft step).",
)
declare_key("grafting_beta2", Unit, "beta2 of the graft method.")
declare_key("grafting_eps", PosFloat, "Epsilon of the graft method.")
declare_key(
    "preconditioner_dtype",
    Literal["float32", "float64", "bfloat16"],
    "Dtype of statistics and root inverses; bfloat16 keeps them float32 and runs the "
    "preconditioning matmuls in bfloat16.",
)
declare_key(
    "nesterov",
    bool,
    "Nesterov form of the betas[0] gradient average (NAdam-style). For "
    "Nesterov SGD use optimizer.name=nesterov (name=momentum with nesterov=true is an error).",
)

# -- optimizers -------------------------------------------------------------------------------------
ELEMENTWISE = "dist_opt.optim.elementwise"
SGD_KEYS = {"momentum": 0.9, "dampening": 0.0}
ADAM_KEYS = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "bias_correction": True}

register_rule(
    RuleSpec(
        "sgd",
        f"{ELEMENTWISE}:SGD",
        "Plain SGD (torch.optim.SGD); L2 weight decay.",
        fixed={"momentum": 0.0, "dampening": 0.0, "nesterov": False},
        elementwise=True,
        hints={k: "for momentum set optimizer.name=momentum or nesterov" for k in SGD_KEYS},
    )
)
register_rule(
    RuleSpec(
        "momentum",
        f"{ELEMENTWISE}:SGD",
        "Heavy-ball momentum, PyTorch form b = mu b + (1 - dampening) g.",
        hyper=SGD_KEYS,
        fixed={"nesterov": False},
        elementwise=True,
        hints={"nesterov": "for Nesterov momentum set optimizer.name=nesterov"},
    )
)
register_rule(
    RuleSpec(
        "nesterov",
        f"{ELEMENTWISE}:SGD",
        "Nesterov momentum (torch.optim.SGD nesterov=True).",
        hyper=SGD_KEYS,
        fixed={"nesterov": True},
        elementwise=True,
    )
)
register_rule(
    RuleSpec(
        "adagrad",
        f"{ELEMENTWISE}:Adagrad",
        "Adagrad (torch.optim.Adagrad).",
        hyper={"eps": 1e-10, "lr_decay": 0.0, "initial_accumulator_value": 0.0},
        elementwise=True,
    )
)
register_rule(
    RuleSpec(
        "rmsprop",
        f"{ELEMENTWISE}:RMSProp",
        "RMSProp (torch.optim.RMSprop).",
        hyper={"alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "centered": False},
        structural=("centered",),
        elementwise=True,
    )
)
for _name, _decoupled, _doc in (
    ("adam", False, "Adam with L2 weight decay (Kingma & Ba)."),
    ("adamw", True, "AdamW: Adam with decoupled weight decay (Loshchilov & Hutter)."),
):
    register_rule(
        RuleSpec(
            _name,
            f"{ELEMENTWISE}:Adam",
            _doc,
            hyper=ADAM_KEYS,
            fixed={"decoupled": _decoupled},
            structural=("amsgrad",),
            elementwise=True,
            decoupled_weight_decay=_decoupled,
        )
    )
register_rule(
    RuleSpec(
        "lars",
        "dist_opt.optim.trust:LARS",
        "LARS (You, Gitman, Ginsburg 2017, Alg. 1) with a global lr.",
        hyper={"momentum": 0.9, "trust_coefficient": 0.001, "lars_denominator": "paper"},
        trust_ratio=True,
    )
)
register_rule(
    RuleSpec(
        "lamb",
        "dist_opt.optim.trust:LAMB",
        "LAMB (You et al. 2019, Alg. 2).",
        hyper={"betas": (0.9, 0.999), "eps": 1e-6, "bias_correction": True, "trust_clip": None},
        trust_ratio=True,
        decoupled_weight_decay=True,
    )
)
register_rule(
    RuleSpec(
        "shampoo",
        "dist_opt.optim.shampoo.rule:Shampoo",
        "Blocked distributed Shampoo with grafting.",
        hyper={
            "betas": (0.9, 1.0),
            "eps": 1e-12,
            "max_preconditioner_dim": 1024,
            "precondition_frequency": 20,
            "start_preconditioning_step": 1,
            "exponent_override": None,
            "grafting": "adam",
            "grafting_beta2": 0.999,
            "grafting_eps": 1e-8,
            "preconditioner_dtype": "float32",
            "nesterov": False,
            "bias_correction": True,
        },
        structural=("max_preconditioner_dim", "grafting", "preconditioner_dtype"),
        whole_tensors=True,
        decoupled_weight_decay=True,
        hints={"momentum": "shampoo's first moment is betas[0]"},
    )
)
