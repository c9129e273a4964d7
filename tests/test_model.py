"""Tests for model.py: parity with the official DINOv2 code (reference tensors in ../shared/fixtures), official key
layouts, checkpoint loading, attention paths, stochastic depth, multi-crop forward, the backbone interface the other
scripts rely on, and the smoke run (`python model.py`).

Run: python -m pytest -q tests/test_model.py   (CPU, a few seconds)
"""
import functools
import json

import pytest
import torch

from model import (DINOHead, DinoVisionTransformer, add_residual, backbone_state_dict, infer_model_args,
                   load_model, resolve_attn_impl, vit_base, vit_giant2, vit_small)

ATOL = RTOL = 1e-5  # fixture README: float32 tolerance for an independent implementation
CTOR_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "proj_bias",
             "ffn_bias", "init_values", "ffn_layer", "num_register_tokens", "interpolate_antialias",
             "interpolate_offset")


def assert_close(actual, expected, name=""):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def tiny(**kw):
    """A small ViT with 64-wide heads (so load_model's num_heads inference is right) and registers."""
    args = dict(img_size=56, patch_size=14, embed_dim=128, depth=4, num_heads=2, num_register_tokens=4,
                init_values=1e-5)
    args.update(kw)
    torch.manual_seed(0)
    model = DinoVisionTransformer(**args).eval()
    with torch.no_grad():  # non-trivial values everywhere, like the official fixtures
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "bias")) or "token" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------------------------------------------------
# Parity with the official code (fixtures)
# --------------------------------------------------------------------------------------------------------------------
@functools.lru_cache
def load_fixture(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def vit_fx(fixtures_dir):
    return load_fixture(fixtures_dir / "vit_tiny_reg.pt")


def build_fixture_model(fx, attn_impl):
    model = DinoVisionTransformer(**{k: fx["config"][k] for k in CTOR_ARGS}, attn_impl=attn_impl)
    model.load_state_dict(fx["state_dict"], strict=True)
    return model.eval()


def assert_features(out, ref, name):
    for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        assert_close(out[k], ref[k], f"{name}.{k}")


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
@torch.no_grad()
def test_vit_matches_official_outputs(vit_fx, attn_impl):
    fx = vit_fx
    model = build_fixture_model(fx, attn_impl)
    assert_features(model.forward_features(fx["x"]), fx["out"], "out")
    out_masked = model.forward_features(fx["x"], masks=fx["masks"])
    assert_features(out_masked, fx["out_masked"], "out_masked")
    assert torch.equal(out_masked["masks"], fx["masks"])
    for size in ("84x70", "28x42"):
        assert_features(model.forward_features(fx[f"x_{size}"]), fx[f"out_{size}"], f"out_{size}")
    model.interpolate_antialias, model.interpolate_offset = True, 0.0  # hub "_reg" setting
    for size in ("84x70", "28x42"):
        assert_features(model.forward_features(fx[f"x_{size}"]), fx[f"out_{size}_hubreg"], f"out_{size}_hubreg")


@torch.no_grad()
def test_interpolated_pos_embed_matches_official(vit_fx):
    model = build_fixture_model(vit_fx, "fused")
    for key, ref in vit_fx["pos_embed_interp"].items():
        h, w = (int(s) for s in key.split("_")[0].split("x"))
        hubreg = key.endswith("_hubreg")
        model.interpolate_antialias, model.interpolate_offset = (True, 0.0) if hubreg else (False, 0.1)
        dummy = torch.zeros(1, 1 + (h // 14) * (w // 14), 64)
        assert_close(model.interpolate_pos_encoding(dummy, h, w), ref, f"pos_embed_interp[{key}]")


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_per_block_trace_matches_official(vit_fx, masked):
    model = build_fixture_model(vit_fx, "fused")
    trace = vit_fx["trace_masked" if masked else "trace"]
    x = model.prepare_tokens_with_masks(vit_fx["x"], vit_fx["masks"] if masked else None)
    assert_close(x, trace["tokens_prepared"], "tokens_prepared")
    for i, blk in enumerate(model.blocks):
        x = blk(x)
        assert_close(x, trace[f"after_block_{i}"], f"after_block_{i}")


@torch.no_grad()
def test_intermediate_layers_match_official(vit_fx):
    model = build_fixture_model(vit_fx, "fused")
    ref = vit_fx["intermediate_n2"]
    out = model.get_intermediate_layers(vit_fx["x"], n=2, return_class_token=True, norm=True)
    assert len(out) == 2
    for i, (patch, cls) in enumerate(out):
        assert_close(patch, ref[f"patch_{i}"], f"patch_{i}")
        assert_close(cls, ref[f"cls_{i}"], f"cls_{i}")
    ref = vit_fx["intermediate_idx_reshape_nonorm"]
    out = model.get_intermediate_layers(vit_fx["x"], n=[0, 2], reshape=True, return_class_token=False, norm=False)
    assert_close(out[0], ref["block_0"], "block_0")
    assert_close(out[1], ref["block_2"], "block_2")


@torch.no_grad()
def test_dino_head_matches_official(fixtures_dir):
    fx = torch.load(fixtures_dir / "dino_head.pt", weights_only=True)
    head = DINOHead(in_dim=64, out_dim=128, nlayers=3, hidden_dim=96, bottleneck_dim=32).eval()
    assert list(head.state_dict()) == list(fx["state_dict_keys_fresh"])
    assert torch.equal(head.last_layer.weight_g, torch.ones(128, 1))  # official init
    head.load_state_dict(fx["state_dict"], strict=True)
    assert_close(head.mlp(fx["x"]), fx["mlp_out"], "mlp_out")
    assert_close(head.last_layer.weight, fx["last_layer_weight_effective"], "last_layer_weight_effective")
    assert_close(head(fx["x"]), fx["out"], "out")


# --------------------------------------------------------------------------------------------------------------------
# Official key layouts
# --------------------------------------------------------------------------------------------------------------------
def read_key_list(path):
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [(key, json.loads(shape)) for key, shape, _ in rows]


def key_shapes(model):
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("keys_file,build", [
    ("vits14_reg_keys.txt", lambda: vit_small(num_register_tokens=4, img_size=518, init_values=1.0,
                                              interpolate_antialias=True, interpolate_offset=0.0)),
    ("vitb14_keys.txt", lambda: vit_base(img_size=518, init_values=1.0)),
])
def test_state_dict_matches_official_keys(fixtures_dir, keys_file, build):
    expected = read_key_list(fixtures_dir / keys_file)
    with torch.device("meta"):  # shapes only, no memory or init time
        model = build()
    assert key_shapes(model) == expected  # same names, shapes and order
    assert sum(p.numel() for p in model.parameters()) == sum(torch.Size(s).numel() for _, s in expected)


def chunk_state_dict(sd, depth, block_chunks):
    """The official FSDP training layout: block i of chunk c is stored as blocks.<c>.<i>.*"""
    chunk = depth // block_chunks
    return {(f"blocks.{int(k.split('.')[1]) // chunk}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
            for k, v in sd.items()}


def test_block_chunk_layout_matches_official_and_remaps(fixtures_dir):
    expected = read_key_list(fixtures_dir / "vits14_blockchunks4_keys.txt")
    with torch.device("meta"):
        model = vit_small(img_size=224, init_values=1e-5)
    chunked = chunk_state_dict(model.state_dict(), depth=12, block_chunks=4)
    assert sorted((k, list(v.shape)) for k, v in chunked.items()) == sorted(expected)
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in chunked.items()}}
    assert sorted(backbone_state_dict(ckpt)) == sorted(model.state_dict())


def test_infer_model_args_for_giant_swiglu():
    with torch.device("meta"):
        sd = vit_giant2(img_size=518, init_values=1.0).state_dict()
    args = infer_model_args(sd)
    assert sd["blocks.0.mlp.w12.weight"].shape == (2 * 4096, 1536)  # hidden 4096 (issue, App. B)
    assert args == dict(img_size=518, patch_size=14, in_chans=3, embed_dim=1536, depth=40, num_heads=24,
                        qkv_bias=True, proj_bias=True, num_register_tokens=0, init_values=1.0,
                        ffn_layer="swiglufused", mlp_ratio=4.0, ffn_bias=True)


# --------------------------------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def assert_same_model(loaded, reference):
    assert not loaded.training
    x = torch.randn(2, 3, 70, 42)  # non-native size: exercises the interpolation setting too
    assert_close(loaded.forward_features(x)["x_prenorm"], reference.forward_features(x)["x_prenorm"], "x_prenorm")


def test_load_hub_checkpoint_infers_architecture(tmp_path):
    # Hub "_reg" checkpoints: registers imply antialiased, offset-free interpolation.
    ref = tiny(interpolate_antialias=True, interpolate_offset=0.0)
    torch.save(ref.state_dict(), tmp_path / "dinov2_tiny_reg4_pretrain.pth")
    assert_same_model(load_model(tmp_path / "dinov2_tiny_reg4_pretrain.pth"), ref)
    # No registers, no LayerScale, SwiGLU, no qkv bias: all read off the keys.
    ref = tiny(num_register_tokens=0, init_values=None, ffn_layer="swiglufused", qkv_bias=False, mlp_ratio=3.0)
    torch.save(ref.state_dict(), tmp_path / "plain.pth")
    loaded = load_model(tmp_path / "plain.pth")
    assert (loaded.num_register_tokens, loaded.interpolate_offset, loaded.blocks[0].attn.qkv.bias) == (0, 0.1, None)
    assert_same_model(loaded, ref)


def test_load_hub_checkpoint_with_sidecar_json(vit_fx, fixtures_dir, tmp_path):
    ref = build_fixture_model(vit_fx, "fused")  # 16-wide heads: cannot be inferred, the sidecar says so
    torch.save(vit_fx["state_dict"], tmp_path / "teacher_backbone.pth")
    (tmp_path / "teacher_backbone.json").write_text(json.dumps({"model_args": {k: vit_fx["config"][k]
                                                                               for k in CTOR_ARGS}}))
    loaded = load_model(tmp_path / "teacher_backbone.pth")
    assert loaded.num_heads == 4
    assert_same_model(loaded, ref)
    # The fixture's own config json (bare kwargs plus official extras such as block_chunks, repo) works too.
    torch.save(vit_fx["state_dict"], tmp_path / "vit_tiny_reg.pth")
    (tmp_path / "vit_tiny_reg.json").write_text((fixtures_dir / "vit_tiny_reg.json").read_text())
    assert_same_model(load_model(tmp_path / "vit_tiny_reg.pth"), ref)


def test_load_training_checkpoints(tmp_path):
    teacher, student = tiny(), tiny(num_heads=8)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)  # a different network, so picking the student would show
    head_sd = {f"dino_head.{k}": v for k, v in DINOHead(128, 16, hidden_dim=8, bottleneck_dim=4).state_dict().items()}
    # Official layout: FSDP chunks, "module." prefixes, heads beside the backbone; no model_args.
    chunked = chunk_state_dict(teacher.state_dict(), depth=4, block_chunks=2)
    official = {"teacher": {f"module.backbone.{k}": v for k, v in chunked.items()} | head_sd}
    torch.save(official, tmp_path / "teacher_checkpoint.pth")
    teacher.interpolate_antialias, teacher.interpolate_offset = True, 0.0  # what inference assumes with registers
    assert_same_model(load_model(tmp_path / "teacher_checkpoint.pth"), teacher)
    # This project's train.py layout: the same plus "model_args" (and a student that must not be picked).
    teacher = tiny(num_heads=8)  # 16-wide heads: only model_args can say so
    model_args = dict(img_size=56, patch_size=14, embed_dim=128, depth=4, num_heads=8, num_register_tokens=4,
                      init_values=1e-5)
    ours = {"model_args": model_args, "step": 3,
            "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()} | head_sd,
            "student": {f"backbone.{k}": v for k, v in student.state_dict().items()} | head_sd}
    torch.save(ours, tmp_path / "checkpoint.pth")
    assert_same_model(load_model(tmp_path / "checkpoint.pth"), teacher)


def test_load_mismatch_names_the_keys(tmp_path):
    sd = tiny().state_dict()
    sd.pop("blocks.1.ls2.gamma")
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"missing keys: \['blocks.1.ls2.gamma'\][\s\S]*"
                                           r"unexpected keys: \['blocks.1.extra.weight'\]"):
        load_model(tmp_path / "bad.pth")
    sd = tiny().state_dict()
    sd["norm.weight"] = torch.zeros(7)
    torch.save(sd, tmp_path / "bad_shape.pth")
    with pytest.raises(RuntimeError, match="norm.weight"):
        load_model(tmp_path / "bad_shape.pth")


# --------------------------------------------------------------------------------------------------------------------
# Attention paths, stochastic depth, multi-crop forward
# --------------------------------------------------------------------------------------------------------------------
def test_fused_and_explicit_attention_agree_values_and_gradients():
    model = tiny().train()  # drop_path_rate 0: training mode is deterministic
    x = torch.randn(2, 3, 42, 56)
    w = torch.randn(2, 5 + 12, 128)
    results = {}
    for impl in ("fused", "explicit"):
        model.set_attn_impl(impl)
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = model.forward_features(xi)["x_prenorm"]
        (out * w).sum().backward()
        results[impl] = [out, xi.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(results["fused"], results["explicit"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_last_selfattention_is_softmax_of_last_block():
    model = tiny()
    x = torch.randn(2, 3, 56, 42)
    attn = model.get_last_selfattention(x)
    assert attn.shape == (2, 2, 1 + 4 + 12, 1 + 4 + 12)  # [B, H, cls + registers + patches, ...]
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 17))
    tokens = model.prepare_tokens_with_masks(x)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    y, _ = last.attn(last.norm1(tokens), return_attn=True)
    last.attn.attn_impl = "fused"
    torch.testing.assert_close(y, last.attn(last.norm1(tokens)), atol=1e-5, rtol=1e-5)


def test_auto_attention_choice():
    q32, q16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert resolve_attn_impl("auto", q32) == "fused" and resolve_attn_impl("auto", q16) == "explicit"
    assert resolve_attn_impl("fused", q16) == "fused" and resolve_attn_impl("explicit", q32) == "explicit"
    model, x = tiny(), torch.randn(2, 3, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 on CPU: auto = explicit
        auto = model(x)
        model.set_attn_impl("explicit")
        assert torch.equal(auto, model(x))


@pytest.mark.parametrize("p", [0.05, 0.1, 0.4, 0.5])
@torch.no_grad()
def test_stochastic_depth_keeps_expected_residual(p):
    """Both official paths (per-sample drop_path for p <= 0.1, batch-subset for p > 0.1) are unbiased:
    the mean over many draws of (output - x) equals the full residual."""
    torch.manual_seed(0)
    blk = tiny(embed_dim=16, num_heads=2, init_values=1.0).blocks[0]
    x = torch.randn(8, 5, 16)
    residual = blk.attn_residual(x)
    trials = 4000
    total, dropped = torch.zeros_like(x), 0
    for _ in range(trials):
        r = add_residual(x, blk.attn_residual, p) - x
        total += r
        dropped += int((r.flatten(1).abs().amax(1) == 0).sum())
    # Per-sample scale factor has std <= 1 per draw (subset 4 of 8 at p=0.5), so <= 0.016 over 4000 draws.
    torch.testing.assert_close(total / trials, residual, atol=0.08 * residual.abs().max().item(), rtol=0)
    expected_drop = 8 - max(int(8 * (1 - p)), 1) if p > 0.1 else 8 * p
    assert abs(dropped / trials - expected_drop) < 0.1 * 8 * p + 0.05


def test_block_training_mode_uses_stochastic_depth():
    model = tiny(drop_path_rate=0.5, drop_path_uniform=True).train()
    x = torch.randn(4, 3, 28, 28)
    torch.manual_seed(1)
    a = model.forward_features(x)["x_prenorm"]
    torch.manual_seed(2)
    b = model.forward_features(x)["x_prenorm"]
    assert not torch.allclose(a, b)  # random subsets differ
    a.sum().backward()  # the subset path is differentiable
    model.eval()
    torch.testing.assert_close(model.forward_features(x)["x_prenorm"], model.forward_features(x)["x_prenorm"])


@torch.no_grad()
def test_list_of_crops_equals_per_tensor_forward():
    model = tiny()
    global_crops, local_crops = torch.randn(4, 3, 56, 56), torch.randn(6, 3, 28, 28)
    masks = torch.rand(4, 16) < 0.4
    outs = model.forward_features([global_crops, local_crops], [masks, None])
    for out, ref in zip(outs, (model.forward_features(global_crops, masks), model.forward_features(local_crops))):
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(out[k], ref[k], atol=0, rtol=0)
    assert outs[0]["masks"] is masks and outs[1]["masks"] is None
    assert [o.shape for o in model([global_crops, local_crops])] == [(4, 128), (6, 128)]
    assert len(model.forward_features([global_crops, local_crops])) == 2  # masks=None for all


# --------------------------------------------------------------------------------------------------------------------
# The interface other scripts rely on (model.py's docstring), and the smoke run
# --------------------------------------------------------------------------------------------------------------------
def test_backbone_interface():
    model = tiny(drop_path_rate=0.2)
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == model.n_blocks == 4
    shapes = {tuple((k, tuple(v.shape)) for k, v in blk.state_dict().items()) for blk in model.blocks}
    assert len(shapes) == 1  # identical blocks: FSDP2 shards each, plan.py extrapolates over them
    assert (model.embed_dim, model.patch_size, model.num_register_tokens) == (128, 14, 4)
    assert model.pos_embed.shape == (1, 1 + 16, 128) and model.mask_token.shape == (1, 128)
    out = model(torch.randn(2, 3, 56, 56), masks=torch.rand(2, 16) < 0.5, is_training=True)
    assert {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"} <= set(out)
    head = DINOHead(128, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 128)
    torch.testing.assert_close(head(x), head.bottleneck(x) @ head.last_layer.weight.T)


def test_smoke_run_and_help(capsys):
    import model
    model.main([])
    assert "vit_giant2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        model.main(["--help"])
    assert exit_info.value.code == 0 and "bench.py attention" in capsys.readouterr().out
