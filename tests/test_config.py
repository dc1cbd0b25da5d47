"""Bad configs end with one line per problem naming the dotted key, exit code 2, nothing written."""

from pathlib import Path

import pytest
import yaml

from dist_opt.config import ConfigError, dump_yaml, load_config
from dist_opt.train import main as train_main

GOOD = {"run": {"out_dir": "OUT"}, "task": {"name": "synthetic", "dim": 4, "hidden": 8},
        "data": {"global_batch": 8, "micro_batch": 4}, "train": {"steps": 2, "progress": False},
        "distributed": {"nproc": 1}, "tracking": {"wandb": {"mode": "disabled"}}}


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
    ({}, ["optimizer.name=adamww"], "optimizer.name: Input should be"),
    ({}, ["task.name=imagenet"], "task.name: Input should be"),
    ({}, ["data.global_batch=10", "data.micro_batch=4"], "data.global_batch: 10 is not divisible"),
    ({}, ["distributed.nproc=3"], "data.global_batch: 8 is not divisible by data.micro_batch x world size = 4 x 3"),
    ({}, ["train"], "override 'train': expected dotted.key=value"),
    ({}, ["schedule.name=noam", "schedule.warmup_steps=-1"], "schedule.warmup_steps: Input should be greater"),
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
    assert train_main([str(path), "optimizer.name=lamb", "optimizer.betas=[0.9, 0.99]", "--print-config"]) == 0
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
