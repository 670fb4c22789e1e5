"""Checkpoint files: safetensors + JSON only, atomic (partial writes are never found), last K kept, exact state
round trips, user weight files loaded without unsafe unpickling."""
from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from blip2fast.training import checkpoint as ckpt
from blip2fast.training.optim import build_optimizer


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.query_tokens = torch.nn.Parameter(torch.randn(1, 2, 3))
        self.frozen = torch.nn.Linear(3, 3).requires_grad_(False)


def _trained(seed=0):
    torch.manual_seed(seed)
    m = Tiny()
    opt = build_optimizer(m, lr=1e-2)
    for _ in range(3):
        loss = (m.norm(m.lin(torch.randn(5, 4))) + m.query_tokens.sum()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def _save(run_dir, step, m, opt, keep=3, extra=()):
    return ckpt.save_checkpoint(str(run_dir), step, rank=0, world_size=1, model=m, extra_prefixes=extra,
                                optimizer=opt, trainer_state={"step": step}, data_state={"pos": step}, keep=keep)


def test_files_are_safetensors_and_json_only_and_round_trip_exactly(tmp_path):
    m, opt = _trained()
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = _save(tmp_path, 3, m, opt, extra=("frozen",))
    files = sorted(os.listdir(path))
    assert files == sorted(["meta.json", "model.safetensors", "optimizer.safetensors", "optimizer.json",
                            "trainer.json", "data_rank0.json", "rng_rank0.json", "rng_rank0.safetensors"])
    for f in files:  # every file parses as what its name says: nothing needs unpickling
        p = os.path.join(path, f)
        (load_file if f.endswith(".safetensors") else lambda q: json.load(open(q)))(p)
        with open(p, "rb") as fh:
            assert not fh.read(2).startswith(b"\x80"), f  # no pickle protocol header
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert set(weights) == {"lin.weight", "lin.bias", "norm.weight", "norm.bias", "query_tokens", "frozen.weight",
                            "frozen.bias"}
    expect = (random.random(), np.random.rand(), torch.rand(3))

    m2, opt2 = _trained(seed=1)  # different weights and optimizer state
    state = ckpt.load_checkpoint(path, 0, 1)
    ckpt.load_model_tensors(m2, state["model"], path)
    ckpt.load_optimizer_files(opt2, *state["optimizer"])
    ckpt.set_rng(*state["rng"])
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(3), expect[2])
    for (n, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert state["trainer"] == {"step": 3} and state["data"] == {"pos": 3} and state["step"] == 3


def test_a_partial_write_is_never_latest_and_is_cleaned(tmp_path):
    m, opt = _trained()
    first = _save(tmp_path, 10, m, opt)
    # a writer killed mid-way: a temp folder with some files, and a step folder without meta.json
    tmp = os.path.join(tmp_path, "checkpoints", ".tmp-step_00000020")
    os.makedirs(tmp)
    open(os.path.join(tmp, "model.safetensors"), "wb").write(b"partial")
    broken = os.path.join(tmp_path, "checkpoints", "step_00000030")
    os.makedirs(broken)
    assert ckpt.latest_checkpoint(str(tmp_path)) == first
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [10]
    with pytest.raises(FileNotFoundError, match="never completed"):
        ckpt.find_checkpoint(tmp)
    assert ckpt.find_checkpoint(str(tmp_path)) == first  # a run folder means its latest
    # meta.json naming a file that is gone: not complete either
    meta = json.load(open(os.path.join(first, "meta.json")))
    assert "optimizer.safetensors" in meta["files"]
    _save(tmp_path, 20, m, opt)  # the next save removes the leftover temp folder
    assert not os.path.exists(tmp)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("step_00000020")


def test_keeps_the_newest_k(tmp_path):
    m, opt = _trained()
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, m, opt, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [15, 20]
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["step_00000015", "step_00000020"]


def test_load_refuses_a_checkpoint_of_another_world_size_or_model(tmp_path):
    m, opt = _trained()
    path = _save(tmp_path, 1, m, opt)
    with pytest.raises(ValueError, match="same number of processes"):
        ckpt.load_checkpoint(path, 0, 2)
    other = torch.nn.Linear(4, 5)
    with pytest.raises(ValueError, match="does not fit this model"):
        ckpt.load_model_tensors(other, ckpt.load_checkpoint(path, 0, 1)["model"], path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_user_weight_files_load_with_weights_only(tmp_path):
    good = tmp_path / "tower.pth"
    torch.save({"model": {"visual_encoder.w": torch.ones(2)}}, good)
    assert list(ckpt.read_state_dict_file(str(good))) == ["visual_encoder.w"]
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        ckpt.read_state_dict_file(str(evil))
