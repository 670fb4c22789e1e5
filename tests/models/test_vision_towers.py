"""Image towers: ClipViT (LAVIS CLIP layout) and HFVisionTower against transformers' own models.

Tiny random models only (width 32, 3 layers, 16 px images of 4 px patches), fp32, CPU.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from blip2fast.config import VisionConfig
from blip2fast.models.vision_clip import ClipViT, FusedSelfAttention, clip_state_dict_from_hf
from blip2fast.models.vision_hf import HFVisionTower

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


transformers = pytest.importorskip("transformers")

WIDTH, HEADS, MLP, LAYERS, IMG, PATCH = 32, 4, 64, 3, 16, 4
GRID = IMG // PATCH


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Add noise to every parameter so LayerNorm scales/biases and embeddings are not at their trivial init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def images(batch: int, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def clip_vision_config():
    return transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=IMG, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )


def tiny_clip_cfg(depth: int, **kw) -> VisionConfig:
    args = dict(kind="clip", image_size=IMG, patch_size=PATCH, width=WIDTH, depth=depth, heads=HEADS,
                mlp_hidden=MLP, layer_norm_eps=1e-5, dtype="float32")
    args.update(kw)
    return VisionConfig(**args)


def hf_cfg(path: str, feature_layer: int = -1, image_size: int = IMG) -> VisionConfig:
    return VisionConfig(kind="hf", hf_path=str(path), hf_feature_layer=feature_layer, image_size=image_size,
                        dtype="float32")


@pytest.fixture(scope="module")
def hf_clip():
    torch.manual_seed(0)
    return perturb_(transformers.CLIPVisionModel(clip_vision_config()), seed=1)


# ================================================================ ClipViT
def test_clip_parameter_names_are_lavis():
    model = ClipViT(tiny_clip_cfg(depth=2))
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
             "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
             "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"}
    expected |= {f"transformer.resblocks.{i}.{n}" for i in range(2) for n in block}
    sd = model.state_dict()
    assert set(sd) == expected
    assert sd["conv1.weight"].shape == (WIDTH, 3, PATCH, PATCH)
    assert sd["positional_embedding"].shape == (GRID * GRID + 1, WIDTH)
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * WIDTH, WIDTH)
    assert sd["transformer.resblocks.0.mlp.c_fc.weight"].shape == (MLP, WIDTH)
    assert model.out_width == WIDTH and model.seq_len == GRID * GRID + 1
    norms = [m for m in ClipViT(tiny_clip_cfg(depth=2, layer_norm_eps=1e-3)).modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-3 for m in norms)  # ln_pre + 2 per block, no ln_post


def test_fused_attention_matches_nn_multihead_attention():
    """LAVIS blocks use nn.MultiheadAttention: same parameter names, same numbers (sequence-first there)."""
    torch.manual_seed(0)
    ours = FusedSelfAttention(WIDTH, HEADS)
    perturb_(ours, seed=2)
    ref = nn.MultiheadAttention(WIDTH, HEADS).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 7, WIDTH)
    want = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    assert rel_err(ours(x), want) < 1e-5


@pytest.mark.parametrize("batch", [1, 3])
def test_clip_matches_hf_second_last_layer(hf_clip, batch):
    model = ClipViT(tiny_clip_cfg(depth=LAYERS - 1)).eval()
    model.load_state_dict(clip_state_dict_from_hf(hf_clip.state_dict(), depth=LAYERS - 1), strict=True)
    x = images(batch, seed=batch)
    with torch.no_grad():
        hs = hf_clip(pixel_values=x, output_hidden_states=True).hidden_states
        out = model(x)
    assert out.shape == (batch, GRID * GRID + 1, WIDTH) == (batch, model.seq_len, model.out_width)
    assert rel_err(out, hs[-2]) < 1e-5
    assert rel_err(hs[-1], hs[-2]) > 1e-2  # the layers differ, so the check above picks the right one


def test_clip_full_depth_matches_hf_last_hidden_state(hf_clip):
    model = ClipViT(tiny_clip_cfg(depth=LAYERS)).eval()
    model.load_state_dict(clip_state_dict_from_hf(hf_clip.state_dict()), strict=True)
    x = images(3)
    with torch.no_grad():
        assert rel_err(model(x), hf_clip(pixel_values=x).last_hidden_state) < 1e-5


def test_clip_state_dict_from_hf_prefix_and_errors(hf_clip):
    sd = hf_clip.state_dict()
    plain = clip_state_dict_from_hf(sd)
    full = {f"vision_model.{k}": v for k, v in sd.items()}
    full["text_model.embeddings.token_embedding.weight"] = torch.zeros(5, WIDTH)
    full["visual_projection.weight"] = torch.zeros(8, WIDTH)
    prefixed = clip_state_dict_from_hf(full)
    assert set(prefixed) == set(plain)
    assert all(torch.equal(prefixed[k], plain[k]) for k in plain)
    assert "ln_post.weight" not in plain and not any("post_layernorm" in k for k in plain)
    w = plain["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(w[WIDTH:2 * WIDTH], sd["encoder.layers.1.self_attn.k_proj.weight"])  # [q; k; v] order

    with pytest.raises(ValueError, match="unrecognised"):
        clip_state_dict_from_hf({**sd, "encoder.layers.0.self_attn.qkv.weight": torch.zeros(1)})
    broken = {k: v for k, v in sd.items() if k != "encoder.layers.0.self_attn.v_proj.bias"}
    with pytest.raises(ValueError, match="v_proj"):
        clip_state_dict_from_hf(broken)
    with pytest.raises(ValueError, match="class_embedding"):
        clip_state_dict_from_hf({"foo.weight": torch.zeros(1)})


def test_clip_input_validation():
    model = ClipViT(tiny_clip_cfg(depth=1))
    for bad in [(2, 1, IMG, IMG), (2, 3, IMG + PATCH, IMG + PATCH), (2, 3, IMG, IMG - PATCH), (3, IMG, IMG)]:
        with pytest.raises(ValueError) as e:
            model(torch.zeros(bad))
        assert str(tuple(bad)) in str(e.value) and f"(batch, 3, {IMG}, {IMG})" in str(e.value)
    with pytest.raises(ValueError, match="kind='clip'"):
        ClipViT(VisionConfig(kind="eva"))


def test_clip_low_precision_close_to_fp32(hf_clip):
    model = ClipViT(tiny_clip_cfg(depth=LAYERS - 1)).eval()
    model.load_state_dict(clip_state_dict_from_hf(hf_clip.state_dict(), depth=LAYERS - 1))
    x = images(3)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x)  # fp32 pixels are cast to the tower's dtype
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-2


# ================================================================ HFVisionTower
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """Tiny random models saved to disk, with the in-memory vision model each one must reproduce."""
    T = transformers
    root = tmp_path_factory.mktemp("hf_towers")
    vis = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=IMG,
               patch_size=PATCH)
    text = dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=1, num_attention_heads=HEADS,
                vocab_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    built = {
        "clip_vision": T.CLIPVisionModel(clip_vision_config()),
        "clip_full": T.CLIPModel(T.CLIPConfig(vision_config=dict(vis, intermediate_size=MLP), text_config=text)),
        "siglip_vision": T.SiglipVisionModel(T.SiglipVisionConfig(intermediate_size=MLP, **vis)),
        "siglip_full": T.SiglipModel(T.SiglipConfig(vision_config=dict(vis, intermediate_size=MLP),
                                                    text_config=text)),
        "dinov2": T.Dinov2Model(T.Dinov2Config(mlp_ratio=2, **vis)),
        "dinov2_reg": T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2,
                                                                             **vis)),
        "bert": T.BertModel(T.BertConfig(**text)),
    }
    out = {}
    for i, (name, model) in enumerate(built.items()):
        perturb_(model, seed=10 + i)
        model.save_pretrained(root / name)
        ref = getattr(model, "vision_model", model) if name.endswith("_full") else model
        out[name] = (str(root / name), ref)
    return out


# expected tokens out at 16 px / 4 px patches: CLS for CLIP and Dinov2, none for SigLIP, + Dinov2 registers
SEQ = {"clip_vision": 17, "clip_full": 17, "siglip_vision": 16, "siglip_full": 16, "dinov2": 17, "dinov2_reg": 19}


@pytest.mark.parametrize("name", list(SEQ))
@pytest.mark.parametrize("batch", [1, 3])
def test_hf_tower_last_hidden_state(hf_folders, name, batch):
    path, ref = hf_folders[name]
    tower = HFVisionTower(hf_cfg(path))
    assert tower.out_width == WIDTH and tower.seq_len == SEQ[name]
    assert type(tower.model).__name__ == type(ref).__name__  # the vision sub-model, not the two-tower model
    x = images(batch, seed=batch)
    with torch.no_grad():
        out = tower(x)
        want = ref(pixel_values=x).last_hidden_state
    assert out.shape == (batch, tower.seq_len, tower.out_width)
    assert rel_err(out, want) < 1e-5


@pytest.mark.parametrize("name", ["clip_vision", "clip_full", "siglip_vision", "dinov2", "dinov2_reg"])
def test_hf_tower_second_last_layer(hf_folders, name):
    path, ref = hf_folders[name]
    tower = HFVisionTower(hf_cfg(path, feature_layer=-2))
    assert tower.blocks_run == LAYERS - 1  # the unused last block is not run
    x = images(3, seed=7)
    with torch.no_grad():
        out = tower(x)
        hs = ref(pixel_values=x, output_hidden_states=True).hidden_states
    assert len(hs) == LAYERS + 1
    assert out.shape == (3, SEQ[name], WIDTH)
    assert rel_err(out, hs[-2]) < 1e-5
    assert rel_err(hs[-1], hs[-2]) > 1e-2


@pytest.mark.parametrize("layer", [0, 1, -(LAYERS + 1), LAYERS])
def test_hf_tower_other_feature_layers(hf_folders, layer):
    path, ref = hf_folders["siglip_vision"]
    tower = HFVisionTower(hf_cfg(path, feature_layer=layer))
    x = images(1, seed=3)
    with torch.no_grad():
        out = tower(x)
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    assert rel_err(out, want) < 1e-5
    with pytest.raises(ValueError, match="out of range"):
        HFVisionTower(hf_cfg(path, feature_layer=LAYERS + 1))


@pytest.mark.parametrize("name,interp", [("clip_vision", True), ("dinov2", False)])
def test_hf_tower_other_image_size(hf_folders, name, interp):
    """24 px inputs to a 16 px checkpoint: 36 patches + CLS, positions interpolated as the model does it."""
    path, ref = hf_folders[name]
    tower = HFVisionTower(hf_cfg(path, image_size=24))
    assert tower.seq_len == 37
    x = images(3, size=24, seed=5)
    with torch.no_grad():
        out = tower(x)
        want = ref(pixel_values=x, **({"interpolate_pos_encoding": True} if interp else {})).last_hidden_state
    assert out.shape == (3, 37, WIDTH)
    assert rel_err(out, want) < 1e-5


def test_hf_tower_loads_in_config_dtype(hf_folders):
    path, ref = hf_folders["siglip_full"]
    cfg = VisionConfig(kind="hf", hf_path=path, hf_feature_layer=-2, image_size=IMG, dtype="bfloat16")
    tower = HFVisionTower(cfg)
    assert all(p.dtype == torch.bfloat16 for p in tower.parameters())
    x = images(3, seed=11)
    with torch.no_grad():
        out = tower(x)  # fp32 pixels are cast to the tower's dtype
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert out.dtype == torch.bfloat16
    assert rel_err(out, want) < 5e-2


def test_hf_tower_input_validation(hf_folders):
    tower = HFVisionTower(hf_cfg(hf_folders["clip_vision"][0]))
    for bad in [(2, 1, IMG, IMG), (2, 3, IMG + PATCH, IMG + PATCH), (3, IMG, IMG)]:
        with pytest.raises(ValueError) as e:
            tower(torch.zeros(bad))
        assert str(tuple(bad)) in str(e.value) and f"(batch, 3, {IMG}, {IMG})" in str(e.value)


def test_hf_tower_bad_paths(hf_folders, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as e:
        HFVisionTower(hf_cfg(missing))
    assert str(missing) in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        HFVisionTower(hf_cfg(empty))
    assert str(empty) in str(e.value) and "config.json" in str(e.value) and "weights.bin" in str(e.value)

    bert = hf_folders["bert"][0]
    with pytest.raises(ValueError) as e:
        HFVisionTower(hf_cfg(bert))
    assert bert in str(e.value) and "'bert'" in str(e.value) and "not a vision model" in str(e.value)

    with pytest.raises(ValueError, match="kind='hf'"):
        HFVisionTower(VisionConfig(kind="clip", hf_path=bert))


def test_hf_tower_missing_weights_is_an_error(hf_folders, tmp_path):
    """A folder whose weights do not cover the vision model must not load as a partly random tower."""
    T = transformers
    folder = tmp_path / "wrong_weights"
    T.CLIPVisionModel(clip_vision_config()).save_pretrained(folder)
    dino_cfg = T.Dinov2Config(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              image_size=IMG, patch_size=PATCH, mlp_ratio=2)
    dino_cfg.save_pretrained(folder)  # config says Dinov2, weights are CLIP's
    with pytest.raises(ValueError) as e:
        HFVisionTower(hf_cfg(folder))
    assert str(folder) in str(e.value) and "lack" in str(e.value)


def test_modules_do_not_import_transformers():
    code = ("import sys; import blip2fast.models.vision_hf, blip2fast.models.vision_clip; "
            "assert 'transformers' not in sys.modules, 'transformers imported at module import'")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eva_layer_norm_keeps_a_half_tower_dtype_under_autocast(dtype):
    """EVA's norms in a bf16 tower return bf16 under autocast (what the next linear casts to), within one bf16
    rounding of autocast's float32 norm; a float32 tower is nn.LayerNorm unchanged (LAVIS parity)."""
    from blip2fast.models.vision import TowerLayerNorm

    g = torch.Generator().manual_seed(4)
    norm = TowerLayerNorm(88, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(88, generator=g))
        norm.bias.copy_(0.1 * torch.randn(88, generator=g))
    norm = norm.to(dtype)
    x = (3 + 2 * torch.randn(7, 13, 88, generator=g)).to(dtype)
    plain = nn.LayerNorm(88, eps=1e-6).to(dtype)
    plain.load_state_dict(norm.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, autocast_ref = norm(x), plain(x)
    exact = nn.functional.layer_norm(x.double(), (88,), norm.weight.double(), norm.bias.double(), 1e-6)
    if dtype == torch.bfloat16:
        # CUDA autocast's route: float32 norm, then the next linear's cast to bf16
        cuda_route = nn.functional.layer_norm(x.float(), (88,), norm.weight.float(), norm.bias.float(), 1e-6)
        assert got.dtype == torch.bfloat16
        assert ((got.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()  # one bf16 rounding
        assert ((got.double() - cuda_route.to(torch.bfloat16).double()).abs() <= 2 ** -7 * exact.abs() + 1e-5).all()
    else:
        assert torch.equal(got, autocast_ref)
    assert torch.equal(norm(x), plain(x))  # no autocast: nn.LayerNorm itself
