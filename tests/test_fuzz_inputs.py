"""Bad input never ends in a traceback: configs, YAML files, CLI arguments and hostfiles are fuzzed
with Hypothesis. Every bad case ends with exit code 2, ``config error:`` / ``dist-opt launch:`` lines
that name the field (or file and line), and nothing written.

Each generated config is broken on purpose in exactly one known place (wrong type, unknown key,
negative or zero size, NaN/inf, unknown optimizer/task/schedule name, a value nested into a value, a valid
value for a key the optimizer does not read),
so the test knows which field the message must name. The base config is a valid one-rank, one-step
run, so a case that were wrongly accepted would fail the exit-code check rather than hang.
Examples are derandomized (the same ones every run: a reproducible CI).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dist_opt.cli import COMMANDS as CLI_COMMANDS
from dist_opt.cli import main as cli_main
from dist_opt.config import ConfigError, load_config
from dist_opt.config.schema import Config
from dist_opt.train import main as train_main

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- the schema's leaves -------------------------------------------------------------------------------------
def _leaves(model: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key (by alias) -> default value of every leaf field of the config schema."""
    out: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        key = prefix + (f.alias or name)
        ann = f.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out.update(_leaves(ann, key + "."))
        else:
            out[key] = f.get_default(call_default_factory=True)
    return out


LEAVES = _leaves(Config)
SECTIONS = {k.rsplit(".", 1)[0] for k in LEAVES if "." in k}
CHOICES = {
    "task.name": "task",
    "optimizer.name": "optimizer",
    "schedule.name": "schedule",
    "distributed.backend": "backend",
    "optimizer.grafting": "grafting",
}
POSITIVE = [
    "data.global_batch",
    "data.micro_batch",
    "train.steps",
    "train.epochs",
    "task.hidden",
    "task.dim",
    "task.seq_len",
    "checkpoint.keep",
    "train.log_every",
    "distributed.nproc",
    "schedule.T_0",
    "optimizer.precondition_frequency",
    "train.max_consecutive_skips",
    "task.eval_size",
]
NON_NEGATIVE = ["run.seed", "train.eval_every", "checkpoint.every_steps", "schedule.warmup_steps"]
FINITE_POSITIVE = ["optimizer.lr", "distributed.timeout_s", "distributed.bucket_mb", "schedule.gamma"]
#: valid, non-default values of keys adamw does not read
NOT_ADAMW = {
    "optimizer.momentum": 0.5,
    "optimizer.dampening": 0.5,
    "optimizer.alpha": 0.5,
    "optimizer.centered": True,
    "optimizer.trust_coefficient": 0.5,
    "optimizer.grafting": "sgd",
    "optimizer.max_preconditioner_dim": 8,
    "optimizer.nesterov": True,
    "optimizer.lr_decay": 0.5,
}
BOOL_WORDS = {"0", "1", "true", "false", "yes", "no", "on", "off", "t", "f", "y", "n"}


def test_the_curated_fields_exist():
    for key in [*CHOICES, *POSITIVE, *NON_NEGATIVE, *FINITE_POSITIVE, *NOT_ADAMW]:
        assert key in LEAVES, key


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


WORDS = st.text(string.ascii_letters + "_-", min_size=1, max_size=12).filter(
    lambda w: (
        not _is_number(w)
        and w.lower() not in BOOL_WORDS | {"null", "none", "nan", "inf"}
        and not w.startswith("-")
    )
)


@st.composite
def mutations(draw) -> tuple[str, Any, str]:
    """(dotted key, bad value, the key the error must name)."""
    kind = draw(
        st.sampled_from(
            ["type", "unknown", "size", "nonneg", "nonfinite", "choice", "nested", "inapplicable"]
        )
    )
    if kind == "type":
        key = draw(st.sampled_from(sorted(LEAVES)))
        default = LEAVES[key]
        if isinstance(default, dict):
            bad = draw(st.sampled_from([[1, 2], "text", 3]))
        elif isinstance(default, bool):
            bad = draw(st.one_of(st.just([True]), st.just({"a": 1}), WORDS))
        elif isinstance(default, int | float) and not isinstance(default, bool):
            bad = draw(st.one_of(WORDS, st.just([1]), st.just({"bogus": [1]})))
        else:
            bad = draw(st.sampled_from([{"bogus": [1]}, [{"x": 1}]]))
        return key, bad, key
    if kind == "unknown":
        section = draw(st.sampled_from(sorted(SECTIONS) + [""]))
        fields = (
            {k.rsplit(".", 1)[-1] for k in LEAVES if k.startswith(section + ".")}
            if section
            else {k.split(".")[0] for k in LEAVES}
        )
        name = draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda n: n not in fields))
        key = f"{section}.{name}" if section else name
        return key, draw(st.one_of(st.integers(), WORDS, st.just([1]))), key
    if kind == "size":
        key = draw(st.sampled_from(POSITIVE))
        return key, draw(st.integers(max_value=0)), key
    if kind == "nonneg":
        key = draw(st.sampled_from(NON_NEGATIVE))
        return key, draw(st.integers(max_value=-1)), key
    if kind == "nonfinite":
        key = draw(st.sampled_from(FINITE_POSITIVE))
        return key, draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -1e-3])), key
    if kind == "inapplicable":  # the base config's optimizer is the default, adamw
        key = draw(st.sampled_from(sorted(NOT_ADAMW)))
        return key, NOT_ADAMW[key], key
    if kind == "choice":
        key = draw(st.sampled_from(sorted(CHOICES)))
        return key, draw(WORDS), key
    key = draw(st.sampled_from([k for k, v in LEAVES.items() if not isinstance(v, dict | list)]))
    return f"{key}.{draw(st.from_regex(r'[a-z]{1,8}', fullmatch=True))}", 1, key


def base_tree(out_dir: Path) -> dict:
    return {
        "run": {"out_dir": str(out_dir)},
        "task": {"name": "synthetic", "dim": 4, "hidden": 4, "eval_size": 16},
        "data": {"global_batch": 8, "micro_batch": 8},
        "train": {"steps": 1, "progress": False},
        "distributed": {"nproc": 1},
        "tracking": {"wandb": {"mode": "disabled"}},
    }


def set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = tree
    for p in parents:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {} if nxt is None else nxt
        if not isinstance(nxt, dict):  # nesting into a value: only the YAML route can express it
            node[p] = {last: value}
            return
        node = nxt
    node[last] = value


def flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def call(fn, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = fn(argv)
        except SystemExit as e:  # argparse and friends: still an exit code, never a traceback
            code = e.code if isinstance(e.code, int) else 2
    return code, err.getvalue()


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_config_error(code: int, err: str, must_name: str | None) -> list[str]:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert lines and "Traceback" not in err, err
    assert all(x.startswith("config error:") for x in lines), err
    if must_name is not None:
        assert any(must_name in x for x in lines), f"{must_name!r} not named in:\n{err}"
    return lines


# -- configs -------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(mutation=mutations(), via=st.sampled_from(["yaml", "override"]))
def test_a_broken_config_is_one_clear_error_and_writes_nothing(mutation, via):
    key, value, named = mutation
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "out"
        tree = base_tree(out)
        overrides = []
        if via == "yaml":
            set_dotted(tree, key, value)
        else:
            overrides.append(f"{key}={flow(value)}")
        cfg = tmp / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(tree))
        before = snapshot(tmp)
        code, err = call(train_main, [str(cfg), *overrides])
        lines = assert_config_error(code, err, named)
        assert len(lines) <= 2, err  # one problem -> one line (two for a tuple with two bad items)
        assert snapshot(tmp) == before and not out.exists()


@FUZZ
@given(
    blocks=st.lists(
        st.sampled_from(
            [
                "run:\n  seed: 1",
                "train:\n  steps: 2\n  progress: false",
                "data: {micro_batch: 4}",
                "# a comment",
                "",
            ]
        ),
        max_size=6,
    ),
    breaker=st.sampled_from(
        [
            "key: [1, 2",
            "key: 'open",
            "\tseed: 1",
            "a: b: c",
            "- x\ny: 1",
            "{a: 1",
            "key: @reserved",
            "x: !!python/object:os.system ls",
            "&a x: *b",
        ]
    ),
    at=st.integers(min_value=0, max_value=6),
)
def test_yaml_syntax_errors_name_the_line(blocks, breaker, at):
    """A valid document with one broken construct between its blocks: the error names a line at or
    after it."""
    before = [x for b in blocks[:at] for x in b.split("\n")]
    after = [x for b in blocks[at:] for x in b.split("\n")]
    at = len(before)
    text_lines = [*before, *breaker.split("\n"), *after]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text("\n".join(text_lines) + "\n")
        try:
            yaml.safe_load(cfg.read_text())
            assume(False)  # the breaker did not break this document (e.g. inside a block scalar)
        except yaml.YAMLError:
            pass
        code, err = call(train_main, [str(cfg), f"run.out_dir={tmp}/out"])
        (line,) = assert_config_error(code, err, str(cfg))
        assert "YAML syntax error at line " in line, line
        n = int(line.split("YAML syntax error at line ")[1].split(",")[0])
        assert at + 1 <= n <= len(text_lines) + 1, (n, text_lines)
        assert not (Path(tmp) / "out").exists()


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_file_content_never_gives_a_traceback(text):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(text, encoding="utf-8", errors="surrogateescape")
        try:
            load_config(
                cfg,
                [
                    "distributed.nproc=1",
                    "train.steps=1",
                    f"run.out_dir={tmp}/out",
                    "tracking.wandb.mode=disabled",
                    "train.progress=false",
                ],
            )
            assume(False)  # a valid config: it would train, which is not what this test is about
        except ConfigError:
            pass
        code, err = call(train_main, [str(cfg), "distributed.nproc=1", f"run.out_dir={tmp}/out"])
        assert_config_error(code, err, str(cfg))
        assert not (Path(tmp) / "out").exists()


def test_undecodable_and_missing_files(tmp_path):
    bad = tmp_path / "latin.yaml"
    bad.write_bytes(b"run:\n  out_dir: caf\xe9\n")
    (line,) = assert_config_error(*call(train_main, [str(bad)]), str(bad))
    assert "cannot read" in line
    for missing in (tmp_path / "nope.yaml", tmp_path):  # a missing file, a directory
        (line,) = assert_config_error(*call(train_main, [str(missing)]), str(missing))
        assert "file not found" in line
    assert snapshot(tmp_path) == {"latin.yaml"}


@FUZZ
@given(name=st.text(string.ascii_letters + string.digits + "_-./ ", min_size=1, max_size=30))
def test_missing_config_files_are_named(name):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "missing", name)
        (line,) = assert_config_error(*call(train_main, [path]), path)
        assert "file not found" in line


# -- command lines -------------------------------------------------------------------------------------------
COMMANDS = {*CLI_COMMANDS, "-V", "--version", "-h", "--help"}


@FUZZ
@given(cmd=st.text(min_size=1, max_size=15).filter(lambda c: c not in COMMANDS and "\x00" not in c))
def test_unknown_commands(cmd):
    code, err = call(cli_main, [cmd, "x"])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[0] == f"dist-opt: unknown command {cmd!r}"


@st.composite
def bad_train_argv(draw, cfg: str) -> tuple[list[str], str]:
    """(argv after 'train', text the error must contain) with exactly one bad item among good overrides."""
    good = draw(
        st.lists(
            st.sampled_from(["train.steps=1", "run.seed=3", "optimizer.lr=0.1", "data.micro_batch=8"]),
            max_size=3,
        )
    )
    kind = draw(st.sampled_from(["flag", "no-equals", "empty-key", "unknown-key", "no-config"]))
    if kind == "no-config":
        return [], "required: config"
    if kind == "flag":
        flag = "--" + draw(
            st.from_regex(r"[a-z][a-z-]{0,10}", fullmatch=True).filter(
                lambda f: f not in ("help", "print-config")
            )
        )
        return [cfg, *good, flag], flag
    if kind == "no-equals":
        word = draw(st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True))
        return [cfg, *good, word], repr(word)
    if kind == "empty-key":
        key = draw(st.sampled_from(["", ".", "a..b", "train."]))
        return [cfg, *good, f"{key}=1"], "empty key segment"
    key = "train." + draw(
        st.from_regex(r"[a-z]{3,10}", fullmatch=True).filter(
            lambda k: k not in {x.split(".")[1] for x in LEAVES if x.startswith("train.")}
        )
    )
    return [cfg, *good, f"{key}=1"], key


@FUZZ
@given(data=st.data())
def test_bad_train_arguments(data):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(base_tree(Path(tmp) / "out")))
        argv, named = data.draw(bad_train_argv(str(cfg)))
        for fn, args in ((cli_main, ["train", *argv]), (train_main, argv)):
            (line,) = assert_config_error(*call(fn, args), named)
        assert not (Path(tmp) / "out").exists()


# -- hostfiles -----------------------------------------------------------------------------------------------
LABEL = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
HOST = st.one_of(
    st.lists(LABEL, min_size=1, max_size=3).map(".".join),
    st.integers(min_value=1, max_value=2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n))),
)
BAD_HOST = st.one_of(
    st.tuples(LABEL, st.sampled_from(list("!@$%^&*()_+{}|<>?,;'\"\\")), LABEL).map("".join),
    LABEL.map(lambda label: "-" + label),
    LABEL.map(lambda label: label + "-"),
    st.tuples(LABEL, LABEL).map(lambda t: f"{t[0]}..{t[1]}"),
    st.just("a" * 64 + ".com"),
)
BAD_FIELD = st.one_of(
    st.integers(max_value=0).map(lambda n: f"slots={n}"),
    WORDS.map(lambda w: f"slots={w}"),
    st.just("slots="),
    st.just("slots"),
    st.tuples(WORDS.filter(lambda w: w != "slots"), WORDS).map(lambda t: f"{t[0]}={t[1]}"),
    st.just("slots=1 slots=2"),
)


@st.composite
def hostfiles(draw) -> tuple[str, int | None, list[tuple[str, int]]]:
    """(text, line number of the first bad line or None, the hosts a parser must return)."""
    n = draw(st.integers(min_value=0, max_value=6))
    names = draw(st.lists(HOST, min_size=n, max_size=n, unique=True))
    lines, hosts = [], []
    bad_at = None
    for name in names:
        for _ in range(draw(st.integers(0, 1))):
            lines.append(draw(st.sampled_from(["", "# comment", "   ", "\t# indented comment"])))
        slots = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=512)))
        sep = draw(st.sampled_from([" ", "\t", "   "]))
        line = name if slots is None else f"{name}{sep}slots={slots}"
        if draw(st.booleans()):
            line += draw(st.sampled_from(["  # trailing comment", "#c", " "]))
        lines.append(line)
        hosts.append((name, slots or 1))
    if draw(st.booleans()):  # one bad line somewhere
        kind = draw(st.sampled_from(["host", "field", "duplicate"]))
        at = draw(st.integers(min_value=0, max_value=len(lines)))
        if kind == "host":
            bad = draw(BAD_HOST) + draw(st.sampled_from(["", " slots=2"]))
        elif kind == "field":
            bad = draw(HOST.filter(lambda h: h not in names)) + " " + draw(BAD_FIELD)
        else:
            if not hosts:
                return "\n".join(lines), None, hosts
            dup = draw(st.sampled_from(hosts))[0]
            first = next(i for i, x in enumerate(lines) if x.split("#")[0].split()[:1] == [dup])
            at = draw(st.integers(min_value=first + 1, max_value=len(lines)))
            bad = dup
        lines.insert(at, bad)
        bad_at = at + 1
    return "\n".join(lines), bad_at, hosts


@FUZZ
@given(case=hostfiles())
def test_hostfile_parsing_names_the_first_bad_line(case):
    from dist_opt.launch.errors import LaunchError
    from dist_opt.launch.hostfile import parse_hostfile

    text, bad_at, hosts = case
    try:
        parsed = parse_hostfile(text, source="hosts.txt")
    except LaunchError as e:
        msg = str(e)
        assert "\n" not in msg
        if bad_at is None:
            assert not hosts and msg == "hosts.txt: no hosts (expected lines of 'HOST slots=N')"
        else:
            assert msg.startswith(f"hosts.txt:{bad_at}: "), (msg, text)
        return
    assert bad_at is None, f"bad line {bad_at} accepted:\n{text}"
    assert [(h.name, h.slots) for h in parsed] == hosts


@settings(FUZZ, max_examples=15)
@given(case=hostfiles().filter(lambda c: c[1] is not None))
def test_dist_opt_launch_rejects_a_bad_hostfile_in_one_line(case):
    text, bad_at, _ = case
    with tempfile.TemporaryDirectory() as tmp:
        hostfile, cfg = Path(tmp) / "hosts", Path(tmp) / "cfg.yaml"
        hostfile.write_text(text)
        cfg.write_text(yaml.safe_dump(base_tree(Path(tmp) / "out")))
        code, err = call(cli_main, ["launch", "--hostfile", str(hostfile), "--dry-run", str(cfg)])
        assert code == 2 and "Traceback" not in err, err
        (line,) = [x for x in err.splitlines() if x.strip()]
        assert line.startswith(f"dist-opt launch: {hostfile}:{bad_at}: "), line
        assert snapshot(Path(tmp)) == {"hosts", "cfg.yaml"}


def test_unreadable_hostfiles(tmp_path):
    from dist_opt.launch.errors import LaunchError
    from dist_opt.launch.hostfile import read_hostfile

    with pytest.raises(LaunchError, match=r"nope: hostfile not found$"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "bin").write_bytes(b"node1 slots=\xff\n")
    with pytest.raises(LaunchError, match=r"bin: cannot read hostfile"):
        read_hostfile(tmp_path / "bin")
