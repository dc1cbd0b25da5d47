"""Checkpoint pieces that need no process group: the JSON/tensor codec, folder validation, latest
discovery, keep-last-k, resume-path resolution, and the allow-list unpickler of DCP's metadata."""

from __future__ import annotations

import io
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from dist_opt.checkpoint import CheckpointError, codec, store
from dist_opt.checkpoint.resume import resolve_resume
from dist_opt.checkpoint.safe_metadata import load_metadata
from dist_opt.config import ConfigError, load_config

# the folders here are written by DCP in this process without a process group, which DCP warns about
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


# -- codec ---------------------------------------------------------------------------------------
def test_codec_round_trip_keeps_types_and_exact_values():
    t1, t2 = torch.randn(3), torch.arange(4)
    state = {
        "a": (1, 2.5, None),
        3: [True, "x", float("inf")],
        "$odd": {"w": t1},
        "n": {"deep": [t2, 0.1 + 0.2]},
        (1, 2): "tuple key",
        "nan": float("nan"),
    }
    store_: dict[str, torch.Tensor] = {}

    def put(key, t):
        store_[key] = t
        return {codec.TENSOR: key}

    skel = codec.encode(state, "p", put)
    text = codec.dumps(skel)  # must be JSON
    back = codec.decode(json.loads(text), lambda ref: store_[ref[codec.TENSOR]])
    assert back["a"] == (1, 2.5, None) and isinstance(back["a"], tuple)
    assert back[3][:2] == [True, "x"] and back[3][2] == float("inf")
    assert back["n"]["deep"][1] == 0.1 + 0.2  # bit-exact float
    assert back[(1, 2)] == "tuple key" and math.isnan(back["nan"])
    assert back["$odd"]["w"] is t1 and back["n"]["deep"][0] is t2
    assert sorted(store_) == ["p/$odd/w", "p/n/deep/0"]
    assert [r[codec.TENSOR] for r in codec.refs(json.loads(text))] == ["p/$odd/w", "p/n/deep/0"]


def test_codec_refuses_values_it_cannot_store_naming_the_path():
    with pytest.raises(TypeError, match="p/fn: values of type function"):
        codec.encode({"fn": lambda: 1}, "p", lambda k, t: {})


# -- folders -------------------------------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    """A real (single-process) DCP checkpoint folder with a manifest and marker."""
    folder = store.step_dir(root, step)
    store.prepare(folder)
    dcp.save(
        {"w": torch.full((64,), float(step))}, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True
    )
    files = {
        p.name: store.digest(p)
        for p in folder.iterdir()
        if p.name.endswith(".distcp") or p.name == ".metadata"
    }
    manifest = {"format": store.FORMAT, "version": store.VERSION, "step": step, "files": files}
    if complete:
        store.finalize(folder, manifest)
    else:
        (folder / store.MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_check_detects_incomplete_truncated_and_corrupt_folders(tmp_path):
    root = tmp_path / "checkpoints"
    good = fake_checkpoint(root, 5)
    assert store.check(good).ok
    partial = fake_checkpoint(root, 6, complete=False)
    assert "incomplete" in store.check(partial).problem
    data = next(good.glob("__0_*.distcp"))
    raw = data.read_bytes()
    data.write_bytes(raw[:-10])
    v = store.check(good, deep=False)
    assert not v.ok and "truncated" in v.problem and data.name in v.problem
    data.write_bytes(raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:])  # same size, one byte flipped
    assert store.check(good, deep=False).ok  # sizes alone cannot see it
    v = store.check(good, deep=True)
    assert not v.ok and "corrupt" in v.problem and data.name in v.problem
    (good / store.MANIFEST).write_text((good / store.MANIFEST).read_text().replace('"step": 5', '"step": 7'))
    assert "does not match" in store.check(good, deep=False).problem


def test_latest_skips_unusable_folders_and_says_why(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    fake_checkpoint(root, 4)
    fake_checkpoint(root, 10, complete=False)  # a killed save
    bad = fake_checkpoint(root, 8)
    f = next(bad.glob("__0_*.distcp"))
    f.write_bytes(f.read_bytes()[:-1])
    said: list[str] = []
    assert store.find_latest(root, report=said.append) == store.step_dir(root, 4)
    assert len(said) == 2 and "step-10 skipped: incomplete" in said[0] and "step-8 skipped" in said[1]
    assert "truncated" in said[1]


def test_keep_last_k_never_deletes_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for s in (1, 2, 3, 4):
        fake_checkpoint(root, s)
    fake_checkpoint(root, 0, complete=False)  # garbage of an old killed save
    fake_checkpoint(root, 9, complete=False)  # newer than the newest complete one: kept (may be in flight)
    store.prune(root, keep=2)
    assert [s for s, _ in store.list_step_dirs(root)] == [3, 4, 9]
    for s in (5, 6):
        fake_checkpoint(root, s)
    store.prune(root, keep=1)
    assert [s for s, _ in store.list_step_dirs(root)] == [6, 9]
    assert store.check(store.step_dir(root, 6)).ok


# -- resume resolution ---------------------------------------------------------------------------
def _cfg(tmp_path: Path, *ov: str):
    return load_config(None, [f"run.out_dir={tmp_path}", "train.steps=4", *ov])


def test_resume_resolution(tmp_path):
    root = store.checkpoints_dir(tmp_path)
    assert resolve_resume(_cfg(tmp_path), root) is None  # nothing there: a fresh run
    said: list[str] = []
    assert resolve_resume(_cfg(tmp_path, "resume=latest"), root, report=said.append) is None
    assert "no complete checkpoint" in said[0]
    fake_checkpoint(root, 3)
    with pytest.raises(ConfigError, match="already holds checkpoints .*step-3.*resume=latest"):
        resolve_resume(_cfg(tmp_path), root)  # a fresh run would overwrite them
    assert resolve_resume(_cfg(tmp_path, "resume=latest"), root) == store.step_dir(root, 3)
    assert resolve_resume(_cfg(tmp_path, f"resume={tmp_path}"), root) == store.step_dir(root, 3)
    with pytest.raises(ConfigError, match="resume: '/no/such/dir' does not exist") as e:
        resolve_resume(_cfg(tmp_path, "resume=/no/such/dir"), root)
    assert e.value.exit_code == 2
    partial = fake_checkpoint(root, 5, complete=False)
    with pytest.raises(CheckpointError, match="cannot resume: incomplete"):
        resolve_resume(_cfg(tmp_path, f"resume={partial}"), root)


# -- unsafe metadata -----------------------------------------------------------------------------
class _Evil:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_metadata_pickle_is_refused_without_running_it(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoints", 1)
    assert load_metadata(folder).state_dict_metadata["w"].size == torch.Size([64])  # the real one loads
    pwned = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil(str(pwned))))
    with pytest.raises(CheckpointError, match=r"\.metadata refused: refused global pathlib.Path"):
        load_metadata(folder)
    assert not pwned.exists()
    (folder / ".metadata").write_bytes(pickle.dumps({"x": 1}) + b"")
    with pytest.raises(CheckpointError, match="expected DCP Metadata"):
        load_metadata(folder)
    os_call = b"cos\nsystem\n(S'touch " + str(pwned).encode() + b"'\ntR."
    (folder / ".metadata").write_bytes(os_call)
    with pytest.raises(CheckpointError, match="refused global os.system"):
        load_metadata(folder)
    assert not pwned.exists()


def test_metadata_with_pickled_objects_or_foreign_paths_is_refused(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoints", 1)
    md = load_metadata(folder)
    md.state_dict_metadata["obj"] = BytesStorageMetadata()  # DCP would torch.load it without weights_only
    buf = io.BytesIO()
    pickle.dump(md, buf)
    (folder / ".metadata").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="refused global .*BytesStorageMetadata"):
        load_metadata(folder)
    md = load_metadata(fake_checkpoint(tmp_path / "other", 1))
    for info in md.storage_data.values():
        info.relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="is not a data file of this folder"):
        load_metadata(folder)


def test_truncated_metadata_gives_a_clear_error(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoints", 1)
    raw = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"\.metadata is corrupt"):
        load_metadata(folder)
