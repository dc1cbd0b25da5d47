"""Bad configs end with one line per problem naming the dotted key, exit code 2, nothing written."""

from pathlib import Path

import pytest
import yaml

from dist_opt.config import ConfigError, dump_yaml, load_config
from dist_opt.train import main as train_main

GOOD = {
    "run": {"out_dir": "OUT"},
    "task": {"name": "synthetic", "dim": 4, "hidden": 8},
    "data": {"global_batch": 8, "micro_batch": 4},
    "train": {"steps": 2, "progress": False},
    "distributed": {"nproc": 1},
    "tracking": {"wandb": {"mode": "disabled"}},
}


def write(tmp_path: Path, tree: dict | str) -> tuple[Path, Path]:
    out = tmp_path / "run"
    text = tree if isinstance(tree, str) else yaml.safe_dump(tree).replace("OUT", str(out))
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p, out


CASES = [
    ({"optimizer": {"nmae": "sgd"}}, [], "optimizer.nmae: unknown key"),
    ({"data": {"global_batch": "many"}}, [], "data.global_batch: Input should be a valid integer"),
    ({"data": {"micro_batch": -4}}, [], "data.micro_batch: Input should be greater than 0"),
    ({"data": {"micro_batch": 0}}, [], "data.micro_batch: Input should be greater than 0"),
    ({}, ["optimizer.lr=nan"], "optimizer.lr: Input should be a finite number"),
    ({}, ["optimizer.name=adamww"], "optimizer.name: unknown optimizer; expected one of: sgd, momentum"),
    (
        {},
        ["optimizer.name=momentum", "optimizer.nesterov=true"],
        "optimizer.nesterov: does not apply to optimizer.name=momentum; for Nesterov momentum set optimizer.name=nesterov",
    ),
    (
        {"optimizer": {"name": "adam", "momentum": 0.9}},
        [],
        "optimizer.momentum: does not apply to optimizer.name=adam",
    ),
    (
        {"optimizer": {"name": "sgd"}},
        ["optimizer.dampening=0.5"],
        "optimizer.dampening: does not apply to optimizer",
    ),
    ({}, ["task.name=imagenet"], "task.name: Input should be"),
    ({}, ["data.global_batch=10", "data.micro_batch=4"], "data.global_batch: 10 is not divisible"),
    (
        {},
        ["distributed.nproc=3"],
        "data.global_batch: 8 is not divisible by data.micro_batch x world size = 4 x 3",
    ),
    ({}, ["train"], "override 'train': expected dotted.key=value"),
    (
        {},
        ["schedule.name=noam", "schedule.warmup_steps=-1"],
        "schedule.warmup_steps: Input should be greater",
    ),
]


@pytest.mark.parametrize("extra, overrides, message", CASES)
def test_bad_config_exits_2_with_named_key_and_writes_nothing(tmp_path, capsys, extra, overrides, message):
    tree = yaml.safe_load(yaml.safe_dump(GOOD))
    for section, values in extra.items():
        tree.setdefault(section, {}).update(values)
    path, out = write(tmp_path, tree)
    assert train_main([str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert all(line.startswith("config error:") for line in err.strip().splitlines())
    assert not out.exists()


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    path, out = write(tmp_path, "run:\n  out_dir: x\ndata: [global_batch: 8\n")
    assert train_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 4" in err and "YAML syntax error" in err
    assert "Traceback" not in err


def test_missing_file(tmp_path, capsys):
    assert train_main([str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: file not found" in err


def test_top_level_must_be_mapping(tmp_path, capsys):
    path, _ = write(tmp_path, "- 1\n- 2\n")
    assert train_main([str(path)]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err


def test_several_problems_one_line_each(tmp_path):
    path, _ = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optimizer.lr=-1", "train.bogus=1"])
    assert len(e.value.problems) == 2


def test_print_config_round_trips(tmp_path, capsys):
    path, out = write(tmp_path, GOOD)
    assert (
        train_main([str(path), "optimizer.name=lamb", "optimizer.betas=[0.9, 0.99]", "--print-config"]) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optimizer"]["name"] == "lamb" and printed["optimizer"]["betas"] == [0.9, 0.99]
    again = load_config(None, [])
    assert again.model_validate(printed).optimizer.name == "lamb"
    assert not out.exists()


def test_checkpoint_async_key_alias():
    cfg = load_config(None, ["checkpoint.async=true"])
    assert cfg.checkpoint.async_save is True
    assert "async: true" in dump_yaml(cfg)


def test_secrets_redacted_in_dump():
    cfg = load_config(None, ["deepspeed.config={api_token: s3cr3t, zero: 1}"])
    text = dump_yaml(cfg)
    assert "s3cr3t" not in text and "<redacted>" in text


def test_schema_documents_every_field():
    from dist_opt.config.schema import Config, Section

    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                yield from walk(ann, f"{prefix}{name}.")
            elif model is not Config:
                yield f"{prefix}{name}", f.description

    missing = [k for k, d in walk(Config) if not d]
    assert not missing, f"config keys without a docstring: {missing}"


def test_every_inapplicable_key_is_refused_by_name():
    """For every optimizer, setting any optimizer.* key it does not read is an error naming the key."""
    from dist_opt.optim.registry import declared_keys, rule_names, rule_spec

    for name in rule_names():
        for key in sorted(set(declared_keys()) - set(rule_spec(name).keys)):
            with pytest.raises(ConfigError) as e:
                load_config(None, [f"optimizer.name={name}", f"optimizer.{key}={NON_DEFAULT[key]}"])
            assert e.value.problems == [e.value.problems[0]], e.value.problems
            assert e.value.problems[0].startswith(f"optimizer.{key}: does not apply to optimizer.name={name}")


def test_only_set_keys_count_and_defaults_are_accepted():
    """Unset keys never trip the check; a key set to its default (as in a config.yaml that lists every
    key) is accepted; several inapplicable keys give one line each."""
    assert load_config(None, ["optimizer.name=lamb"]).optimizer.name == "lamb"
    load_config(None, ["optimizer.name=adamw", "optimizer.alpha=0.99", "optimizer.momentum=null"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optimizer.name=adamw", "optimizer.alpha=0.5", "optimizer.centered=true"])
    assert [p.split(":")[0] for p in e.value.problems] == ["optimizer.alpha", "optimizer.centered"]


def test_applicable_keys_reach_the_rule_and_nothing_else_is_passed():
    from dist_opt.engine.build import rule_from_config, rule_hyper
    from dist_opt.optim.registry import rule_names, rule_spec

    for name in rule_names():
        cfg = load_config(None, [f"optimizer.name={name}"])
        assert set(rule_hyper(cfg.optimizer)) == set(rule_spec(name).keys)
        rule_from_config(cfg.optimizer)
    rule = rule_from_config(load_config(None, ["optimizer.name=rmsprop", "optimizer.alpha=0.5"]).optimizer)
    assert rule.alpha == 0.5 and rule.eps == 1e-8
    rule = rule_from_config(
        load_config(None, ["optimizer.name=nesterov", "optimizer.momentum=0.8"]).optimizer
    )
    assert rule.nesterov is True and rule.momentum == 0.8


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam", "lars", "lamb", "shampoo"])
def test_dumped_config_loads_again_for_every_optimizer(tmp_path, name):
    cfg = load_config(None, [f"optimizer.name={name}"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path).optimizer == cfg.optimizer


#: a valid value other than the default for every optimizer key
NON_DEFAULT = {
    "momentum": "0.5",
    "dampening": "0.5",
    "betas": "[0.5, 0.5]",
    "eps": "0.5",
    "alpha": "0.5",
    "centered": "true",
    "lr_decay": "0.5",
    "initial_accumulator_value": "0.5",
    "amsgrad": "true",
    "bias_correction": "false",
    "trust_coefficient": "0.5",
    "lars_denominator": "tf",
    "trust_clip": "[0, 5]",
    "max_preconditioner_dim": "8",
    "precondition_frequency": "3",
    "start_preconditioning_step": "3",
    "exponent_override": "0.5",
    "grafting": "sgd",
    "grafting_beta2": "0.5",
    "grafting_eps": "0.5",
    "preconditioner_dtype": "float64",
    "nesterov": "true",
}


def test_every_optimizer_key_has_a_sample_value():
    from dist_opt.optim.registry import declared_keys

    assert set(NON_DEFAULT) == set(declared_keys())
