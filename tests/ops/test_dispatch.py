"""The shared backend choice (blip2fast/ops/dispatch.py): argument > BLIP2FAST_BACKEND > automatic; a request never
falls back; unknown names and impossible requests say where they came from and why."""
from __future__ import annotations

import pytest
import torch

from blip2fast.ops import dispatch


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("BLIP2FAST_BACKEND", raising=False)


def checks(**reasons):
    """Backend -> check returning the given reasons; records which checks ran."""
    ran = []

    def make(name, why):
        def check():
            ran.append(name)
            return list(why)
        return check

    return {name: make(name, why) for name, why in reasons.items()}, ran


def test_automatic_takes_the_first_listed_backend_that_can_run():
    c, ran = checks(torch=[], triton=["no GPU"], cpp=[])
    assert dispatch.choose_backend("op", None, c, automatic=("triton", "cpp", "torch")) == "cpp"
    assert ran == ["triton", "cpp"]  # lazily: torch was never asked
    assert dispatch.choose_backend("op", None, c, automatic=("torch",)) == "torch"


def test_argument_beats_environment_beats_automatic(monkeypatch):
    c, _ = checks(torch=[], triton=[])
    monkeypatch.setenv("BLIP2FAST_BACKEND", " triton ")
    assert dispatch.choose_backend("op", None, c, automatic=("torch",)) == "triton"
    assert dispatch.choose_backend("op", "torch", c, automatic=("torch",)) == "torch"
    assert dispatch.requested_backend(None) == ("triton", "BLIP2FAST_BACKEND")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "")
    assert dispatch.requested_backend(None) == (None, "automatic")


def test_a_request_never_falls_back(monkeypatch):
    c, _ = checks(torch=[], triton=["head dim 48 is not supported", "float64"])
    with pytest.raises(RuntimeError, match=r"op: backend 'triton' was requested \(backend argument\) but cannot run "
                                           r"this input: head dim 48 is not supported; float64\. Use backend='torch'"):
        dispatch.choose_backend("op", "triton", c, automatic=("triton", "torch"))
    monkeypatch.setenv("BLIP2FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match=r"\(BLIP2FAST_BACKEND\)"):
        dispatch.choose_backend("op", None, c, automatic=("triton", "torch"))


def test_unknown_names_say_where_they_came_from(monkeypatch):
    c, _ = checks(torch=[], cpp=[])
    with pytest.raises(ValueError, match=r"unknown thing backend 'cuda' \(from backend argument\); choose one of "
                                         r"\('torch', 'cpp'\)"):
        dispatch.choose_backend("op", "cuda", c, automatic=("torch",), what="thing")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "trition")  # a typo is no backend of any op: an error, not ignored
    with pytest.raises(ValueError, match=r"unknown op backend 'trition' \(from BLIP2FAST_BACKEND\)"):
        dispatch.choose_backend("op", None, c, automatic=("torch",))


def test_a_plain_environment_name_drives_the_ops_that_have_it(monkeypatch):
    """BLIP2FAST_BACKEND=triton selects triton where an op has it; an op without triton chooses automatically."""
    with_triton, _ = checks(torch=[], triton=[])
    without, _ = checks(torch=[], cpp=[])
    monkeypatch.setenv("BLIP2FAST_BACKEND", "triton")
    assert dispatch.choose_backend("attn", None, with_triton, automatic=("torch",)) == "triton"
    assert dispatch.choose_backend("sampler", None, without, automatic=("cpp", "torch")) == "cpp"


def test_per_op_environment_entries_win_for_their_op(monkeypatch):
    c, _ = checks(torch=[], triton=[], cpp=[])
    monkeypatch.setenv("BLIP2FAST_BACKEND", "triton, sampler=torch ,attn = cpp")
    assert dispatch.choose_backend("sampler", None, c, automatic=("cpp",)) == "torch"
    assert dispatch.choose_backend("attn", None, c, automatic=("torch",)) == "cpp"
    assert dispatch.choose_backend("other", None, c, automatic=("torch",)) == "triton"
    assert dispatch.requested_backend(None, "sampler", ("torch",)) == ("torch", "BLIP2FAST_BACKEND (sampler=...)")
    monkeypatch.setenv("BLIP2FAST_BACKEND", "sampler=cuda")
    with pytest.raises(ValueError, match=r"unknown op backend 'cuda' \(from BLIP2FAST_BACKEND \(sampler=\.\.\.\)\)"):
        dispatch.choose_backend("sampler", None, c, automatic=("torch",), what="op")


def test_automatic_with_no_possible_backend_lists_every_reason():
    c, _ = checks(torch=["broken"], cpp=["not built"])
    with pytest.raises(RuntimeError, match="no backend can run this input: torch: broken; cpp: not built"):
        dispatch.choose_backend("op", None, c, automatic=("cpp", "torch"))


def test_triton_reasons(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (False, False, "simulated: no triton"))
    assert dispatch.triton_reasons("k", x, dtypes=(torch.float32,)) == ["simulated: no triton"]
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (True, True, ""))  # interpreter: CPU is fine
    assert dispatch.triton_reasons("k", x, dtypes=(torch.float32,)) == []
    assert "float64 is not one of" in dispatch.triton_reasons("k", x.double(), dtypes=(torch.float32,))[0]
    bf16 = dispatch.triton_reasons("k", x.bfloat16(), dtypes=(torch.bfloat16,))
    assert bf16 and "wrongly by the Triton interpreter" in bf16[0]
    monkeypatch.setattr(dispatch, "_triton_status", lambda name: (True, False, ""))  # compiled: CPU is not
    assert "only under its interpreter" in dispatch.triton_reasons("k", x, dtypes=(torch.float32,))[0]
    assert "no Triton kernels for device type 'meta'" in dispatch.triton_reasons(
        "k", x.to("meta"), dtypes=(torch.float32,))[0]


def test_gpu_order_follows_the_measured_file_and_ends_with_torch(monkeypatch, tmp_path):
    """Automatic order on a GPU is what the GPU check measured (measured_backends.json), the `unmeasured` default
    (the reference) before any measurement, and always ends with the reference so any input still runs."""
    from blip2fast.ops import dispatch

    monkeypatch.setattr(dispatch, "_measured", {})
    assert dispatch.gpu_order("itc_loss", ("torch",)) == ("torch",)
    assert dispatch.gpu_order("itc_loss", ("triton",)) == ("triton", "torch")
    monkeypatch.setattr(dispatch, "_measured", {"itc_loss": {"order": ["cpp", "triton"], "measured_on": "H200"}})
    assert dispatch.gpu_order("itc_loss", ("torch",)) == ("cpp", "triton", "torch")
    assert dispatch.gpu_order("layer_norm", ("torch",)) == ("torch",)
    path = tmp_path / "m.json"
    path.write_text('{"ops": {"layer_norm": {"order": ["torch", "triton"]}}}')
    monkeypatch.setattr(dispatch, "MEASURED_FILE", str(path))
    monkeypatch.setattr(dispatch, "_measured", None)
    assert dispatch.measured_backends() == {"layer_norm": {"order": ["torch", "triton"]}}
    assert dispatch.gpu_order("layer_norm", ("triton",)) == ("torch", "triton")
