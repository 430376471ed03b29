import pytest
import torch

from priorzero_core import checkpoint as ckpt
from priorzero_core.errors import CheckpointError


def write(root, iteration, value=1.0):
    w = ckpt.CheckpointWriter(root, iteration)
    w.tensors("model", {"w": torch.full((3,), value)})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))])
    w.torch_state("optim", opt.state_dict())
    w.directory("llm", lambda d: (d / "adapter.txt").write_text("x"))
    return w.commit({"iteration": iteration, "config_hash": "h"})


def test_commit_is_verifiable_and_loads_without_pickle(tmp_path):
    path = write(tmp_path, 1)
    manifest = ckpt.verify(path)
    assert manifest["meta"]["iteration"] == 1 and "llm/adapter.txt" in manifest["files"]
    assert torch.equal(ckpt.load_tensors(path, "model")["w"], torch.ones(3))
    assert "param_groups" in ckpt.load_torch_state(path, "optim")
    assert not list(tmp_path.glob(".tmp-*"))


def test_latest_valid_skips_corrupt_and_interrupted_checkpoints(tmp_path):
    write(tmp_path, 1)
    second = write(tmp_path, 2, value=2.0)
    (second / "model.safetensors").write_bytes(b"garbage")
    interrupted = tmp_path / "iter-000003"
    interrupted.mkdir()
    (interrupted / "model.safetensors").write_bytes(b"half")
    path, manifest = ckpt.latest_valid(tmp_path)
    assert path.name == "iter-000001"
    with pytest.raises(CheckpointError, match="does not match its hash"):
        ckpt.verify(second)
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.verify(interrupted)
    # resuming from 1 moves the broken ones aside (kept, never overwritten) so iteration 2 can be written again
    ckpt.set_aside_newer(tmp_path, 1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("iter-000002.unverified") for n in names)
    assert any(n.startswith("iter-000003.unverified") for n in names)
    assert write(tmp_path, 2).name == "iter-000002"


def test_prune_keeps_newest_valid_and_removes_dead_temp_dirs(tmp_path):
    for i in range(1, 5):
        write(tmp_path, i)
    dead = tmp_path / ".tmp-iter-000009-999999999"
    dead.mkdir()
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["iter-000003", "iter-000004"]
    assert not dead.exists()


class Arbitrary:
    pass


def test_torch_state_refuses_pickled_objects(tmp_path):
    w = ckpt.CheckpointWriter(tmp_path, 1)
    w.torch_state("evil", {"obj": Arbitrary()})  # loading it would need full unpickling
    path = w.commit({})
    with pytest.raises(CheckpointError, match="unreadable"):
        ckpt.load_torch_state(path, "evil")
