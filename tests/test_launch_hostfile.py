"""Hostfile parsing (line-numbered errors), host name validation and host/slot selection.

Where DeepSpeed defines the meaning (hostfile format, --include/--exclude, --num_nodes,
--num_gpus), its own runner functions are the reference.
"""

from __future__ import annotations

import pytest
from deepspeed.launcher.runner import _parse_hostfile, apply_num_nodes_and_gpus, parse_inclusion_exclusion
from hypothesis import given
from hypothesis import strategies as st

from dist_opt.launch.errors import LaunchError
from dist_opt.launch.hostfile import Host, is_valid_host, parse_hostfile, read_hostfile
from dist_opt.launch.selection import Node, nodes_without_hostfile, select_nodes

GOOD = """\
# cluster A
worker-0 slots=4

worker-1.example.org   slots=2   # the small one
10.0.0.7 slots=1
fe80::1 slots=3
"""


def test_parses_hosts_slots_comments_and_blank_lines_in_order():
    hosts = parse_hostfile(GOOD, "hf")
    assert [(h.name, h.slots, h.line) for h in hosts] == [
        ("worker-0", 4, 2),
        ("worker-1.example.org", 2, 4),
        ("10.0.0.7", 1, 5),
        ("fe80::1", 3, 6),
    ]


def test_slots_default_to_one_like_open_mpi():
    assert parse_hostfile("nodeA\nnodeB slots=2\n") == [Host("nodeA", 1, 1), Host("nodeB", 2, 2)]


def test_agrees_with_deepspeeds_own_hostfile_parser():
    text = "# c\nworker-0 slots=4\n\nworker-1 slots=2\n10.0.0.7 slots=8\n"
    ours = {h.name: h.slots for h in parse_hostfile(text)}
    assert ours == dict(_parse_hostfile(text.splitlines(keepends=True)))


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("a slots=1\nb gpus=2\n", 2, "unknown field 'gpus=2'"),
        ("a slots 2\n", 1, "unknown field 'slots'"),
        ("a slots=1\n\n# x\na slots=2\n", 4, "duplicate host 'a' (first given on line 1)"),
        ("a slots=0\n", 1, "slots=0 must be a positive integer"),
        ("a slots=-2\n", 1, "slots=-2 must be a positive integer"),
        ("a slots=two\n", 1, "slots='two' is not an integer"),
        ("a slots=1 slots=2\n", 1, "slots given more than once"),
        ("ok\nbad_host! slots=1\n", 2, "'bad_host!' is not a valid host name"),
        ("-oProxyCommand=x slots=1\n", 1, "is not a valid host name"),
        ("a..b slots=1\n", 1, "'a..b' is not a valid host name"),
        ("user@host slots=1\n", 1, "is not a valid host name"),
    ],
)
def test_bad_lines_name_the_file_and_line(text, line, words):
    with pytest.raises(LaunchError) as err:
        parse_hostfile(text, "cluster.txt")
    assert str(err.value).startswith(f"cluster.txt:{line}: ")
    assert words in str(err.value)


def test_empty_hostfile_is_an_error():
    with pytest.raises(LaunchError, match="hf: no hosts"):
        parse_hostfile("# nothing\n\n", "hf")


def test_missing_hostfile_names_the_path(tmp_path):
    with pytest.raises(LaunchError, match="hostfile not found"):
        read_hostfile(tmp_path / "nope")


@pytest.mark.parametrize("name", ["node1", "a-b.c-d", "x" * 63, "10.1.2.3", "::1", "fe80::1", "gpu01.", "A9"])
def test_valid_host_names(name):
    assert is_valid_host(name)


@pytest.mark.parametrize(
    "name",
    ["", "-a", "a-", "a_b", "a b", "x" * 64, "a..b", "a;rm", "$(id)", "a/b", ".".join(["abcdefgh"] * 30)],
)
def test_invalid_host_names(name):
    assert not is_valid_host(name)


@given(
    st.lists(st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), min_size=1, max_size=6, unique=True),
    st.data(),
)
def test_round_trip_of_generated_hostfiles(names, data):
    slots = [data.draw(st.integers(1, 16)) for _ in names]
    text = "".join(f"{n} slots={s}  # c\n\n" for n, s in zip(names, slots, strict=True))
    assert [(h.name, h.slots) for h in parse_hostfile(text)] == list(zip(names, slots, strict=True))


HOSTS = [Host("w0", 4), Host("w1", 2), Host("w2", 3)]


def _deepspeed_selection(include="", exclude="", num_nodes=-1, num_gpus=-1) -> dict[str, list[int]]:
    pool = {h.name: h.slots for h in HOSTS}
    active = parse_inclusion_exclusion(pool, include, exclude)
    return {k: list(v) for k, v in apply_num_nodes_and_gpus(active, num_nodes, num_gpus).items()}


def _ours(**kw) -> dict[str, list[int]]:
    return {n.host: list(n.slots) for n in select_nodes(HOSTS, **kw)}


@pytest.mark.parametrize(
    "include, exclude",
    [
        ("", ""),
        ("w1", ""),
        ("w2@w0", ""),
        ("w0:1,3@w2", ""),
        ("w0:2@w0:0", ""),
        ("", "w1"),
        ("", "w0:0,1"),
        ("", "w0@w2:2"),
        ("", "w1:0,1"),
    ],
)
def test_include_exclude_match_deepspeed(include, exclude):
    assert _ours(include=include, exclude=exclude) == _deepspeed_selection(include, exclude)


@pytest.mark.parametrize("nnodes, nproc", [(None, None), (2, None), (None, 1), (1, 5), (3, 2)])
def test_nnodes_and_nproc_per_node_match_deepspeeds_num_nodes_num_gpus(nnodes, nproc):
    expected = _deepspeed_selection(num_nodes=nnodes or -1, num_gpus=nproc or -1)
    assert _ours(nnodes=nnodes, nproc_per_node=nproc) == expected


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"include": "w9"}, "'w9' is not in the hostfile"),
        ({"include": "w1:2"}, "host 'w1' has no slot 2"),
        ({"exclude": "w0:x"}, "slot 'x' is not an integer"),
        ({"include": "w0", "exclude": "w1"}, "mutually exclusive"),
        ({"include": "w0", "nnodes": 1}, "cannot be combined"),
        ({"exclude": "w0@w1@w2"}, "no hosts left"),
        ({"nnodes": 4}, "--nnodes 4: the hostfile has only 3 host(s)"),
    ],
)
def test_selection_errors(kw, words):
    with pytest.raises(LaunchError) as err:
        select_nodes(HOSTS, **kw)
    assert words in str(err.value)


def test_without_hostfile_one_local_node_or_unnamed_nodes_for_dry_run():
    assert nodes_without_hostfile(None, 3, dry_run=False) == [Node("localhost", (0, 1, 2))]
    assert nodes_without_hostfile(2, 1, dry_run=True) == [Node(None, (0,)), Node(None, (0,))]
    with pytest.raises(LaunchError, match="--nnodes 2 needs --hostfile"):
        nodes_without_hostfile(2, 1, dry_run=False)
