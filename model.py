"""The DINOv2 backbone (a Vision Transformer) and the DINO/iBOT projection head, written to be read.

Paper: "DINOv2: Learning Robust Visual Features without Supervision", Oquab et al. 2023 (arXiv 2304.07193).
Argument names and state-dict keys follow the official code (github.com/facebookresearch/dinov2), so the
released checkpoints load with `load_model` and code written against the official model runs against this one.

Run:  python model.py              smoke run: a tiny ViT's forward, shapes and parameter counts
      python bench.py attention  CPU seconds of ViT-S/14 + 4 registers: fused vs explicit, fp32 vs bf16

Paper -> code
  App. B (architecture table), ViT-S/B/L/g ........... ARCHS; vit_small, vit_base, vit_large, vit_giant2
  Sec. 4, ViT: patches + [CLS] + learned positions .... PatchEmbed, DinoVisionTransformer.prepare_tokens_with_masks
  Registers (Darcet et al. 2023; hub "_reg" models) ... DinoVisionTransformer(num_register_tokens=...)
  Pre-norm blocks with LayerScale (official code) ..... Block, LayerScale (Touvron et al. 2021, CaiT)
  App. B, SwiGLU FFN for ViT-g ........................ SwiGLUFFN (official "SwiGLUFFNFused" keys and width rule)
  Sec. 5, fast and memory-efficient attention ......... Attention ("fused" = F.scaled_dot_product_attention)
  Sec. 5, efficient stochastic depth .................. drop_add_residual_stochastic_depth, add_residual
  Sec. 4, patch-level (iBOT) objective: mask token .... prepare_tokens_with_masks (mask applied before positions)
  Sec. 4, image/patch-level heads (MLP -> l2 -> WN) ... DINOHead, WeightNormLinear
  Sec. 4, adapting the resolution (224 -> 518) ........ DinoVisionTransformer.interpolate_pos_encoding
  Released weights (hub, training checkpoints) ........ load_model

Shape legend: B batch, N tokens, D width, H heads, K prototypes (out_dim), R register tokens.

Backbone interface that the other scripts (train, plan, bench, eval, distill, visualize) rely on
  DinoVisionTransformer(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio, ffn_layer,
      init_values, num_register_tokens, drop_path_rate, drop_path_uniform, attn_impl, ...): official
      names; a checkpoint's "model_args" holds these kwargs for load_model.
  .blocks: a ModuleList of `depth` identical Blocks. FSDP2 shards each, activation checkpointing wraps
      each, plan.py traces 2- and 4-block copies and extrapolates over them.
  .n_blocks, .embed_dim, .patch_size, .num_register_tokens; .pos_embed [1, 1+N, D] for the img_size
      grid, interpolated for other sizes; .mask_token [1, D] (its requires_grad is turned off when
      nothing is masked). Parameter names are the official keys (layer-wise lr decay reads them).
  forward(x, masks=None, is_training=False) -> the [CLS] token [B, D]; is_training=True returns the
      dict of forward_features: x_norm_clstoken [B, D], x_norm_regtokens [B, R, D], x_norm_patchtokens
      [B, N, D], x_prenorm [B, 1+R+N, D], masks. A list of crop batches gives a list of those.
  get_intermediate_layers(x, n, ...), get_last_selfattention(x), set_attn_impl(name in ATTN_IMPLS).
  DINOHead.bottleneck(x) [B, bottleneck], DINOHead.last_layer.weight [K, bottleneck]: train.py computes
      head(x) = bottleneck(x) @ last_layer.weight.T from them in chunks of rows.
"""
import argparse
import inspect
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.init import trunc_normal_

# --------------------------------------------------------------------------------------------------------------------
# Attention path
# --------------------------------------------------------------------------------------------------------------------
# "fused": F.scaled_dot_product_attention (flash / memory-efficient kernels; never materialises the N x N matrix).
# "explicit": softmax(Q K^T / sqrt(d)) V written out; it can return the attention weights (attention maps).
# "auto" (default): fused, except on a CPU under bf16, where the fused CPU kernel's backward is slower
# than the explicit path (`python bench.py attention` measures both; its numbers are in the README).
ATTN_IMPLS = ("auto", "fused", "explicit")


def resolve_attn_impl(attn_impl, q):
    """The concrete path ("fused" or "explicit") that `attn_impl` means for the query tensor q."""
    if attn_impl != "auto":
        return attn_impl
    return "explicit" if q.device.type == "cpu" and q.dtype == torch.bfloat16 else "fused"


# --------------------------------------------------------------------------------------------------------------------
# Building blocks: patch embedding, attention, feed-forward, LayerScale, stochastic depth
# --------------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Cut the image into patch_size x patch_size patches and project each to D (one strided convolution)."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=768):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _, _, h, w = x.shape
        p = self.patch_size
        assert h % p == 0 and w % p == 0, f"image size {h}x{w} is not a multiple of the patch size {p}"
        x = self.proj(x)  # (B, D, h/p, w/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


class Attention(nn.Module):
    """Multi-head self-attention; `attn_impl` selects the fused kernel or the explicit formula."""

    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, attn_impl="auto"):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, return_attn=False):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D/H)
        attn = None
        if return_attn or resolve_attn_impl(self.attn_impl, q) == "explicit":
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = attn.softmax(dim=-1)
            x = attn @ v  # (B, H, N, D/H)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H), same scale 1/sqrt(D/H)
        x = self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
        return (x, attn) if return_attn else x


class Mlp(nn.Module):
    """The standard ViT feed-forward: Linear -> GELU (exact) -> Linear."""

    def __init__(self, dim, hidden_dim, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(hidden_dim):
    """Official SwiGLUFFNFused width: 2/3 of the MLP width (same parameter count), rounded up to a multiple of 8.
    ViT-g: 1536 * 4 = 6144 -> 4096."""
    return (int(hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020), used for ViT-g (paper App. B). w12 computes both gates in one matmul."""

    def __init__(self, dim, hidden_dim, bias=True):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w3 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)  # 2 x (B, N, hidden)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    """Per-channel scale on each residual branch (CaiT); keeps deep ViTs stable at init (init_values, e.g. 1e-5)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


def drop_path(x, p):
    """Per-sample stochastic depth: zero the residual of a random fraction p of the samples, scale the rest by
    1/(1-p) so the expected residual is unchanged. The branch is still computed for every sample."""
    if p == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)  # (B, 1, 1)
    return x * keep.div_(1.0 - p)


def drop_add_residual_stochastic_depth(x, residual_func, sample_drop_ratio):
    """Paper Sec. 5 "efficient stochastic depth": compute the residual branch only on a random subset of
    int(B * (1 - p)) samples (skipping the dropped ones saves compute and memory) and add it scaled by
    B / subset, which keeps the expected residual equal to residual_func(x) (official implementation)."""
    B = x.shape[0]
    subset_size = max(int(B * (1 - sample_drop_ratio)), 1)
    keep = torch.randperm(B, device=x.device)[:subset_size]  # which samples get the residual
    residual = residual_func(x[keep])  # (subset, N, D)
    x_plus = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(x.dtype), alpha=B / subset_size)
    return x_plus.view_as(x)


def add_residual(x, residual_func, p):
    """x + residual_func(x) with stochastic depth at rate p. Official rule: the subset trick only pays for itself
    above p = 0.1; at or below it every sample computes the branch and per-sample drop_path zeroes some."""
    if p > 0.1:
        return drop_add_residual_stochastic_depth(x, residual_func, p)
    return x + drop_path(residual_func(x), p)


# --------------------------------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm block: x = x + ls1(attn(norm1(x))); x = x + ls2(ffn(norm2(x))), with stochastic depth in training."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True, ffn_bias=True,
                 drop_path=0.0, init_values=None, ffn_layer="mlp", attn_impl="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        ffn_class = {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}[ffn_layer]
        self.mlp = ffn_class(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x):
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_residual(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x):
        p = self.sample_drop_ratio if self.training else 0.0
        x = add_residual(x, self.attn_residual, p)
        return add_residual(x, self.ffn_residual, p)


# --------------------------------------------------------------------------------------------------------------------
# Vision Transformer
# --------------------------------------------------------------------------------------------------------------------
class DinoVisionTransformer(nn.Module):
    """ViT backbone with [CLS], optional registers, learned position embeddings and a final LayerNorm (Sec. 4).

    Token order everywhere: [CLS], R registers, N patches (row-major). Registers get no position embedding."""

    def __init__(self, img_size=224, patch_size=14, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True, drop_path_rate=0.0,
                 drop_path_uniform=False, init_values=None, ffn_layer="mlp", num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1, attn_impl="auto"):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # iBOT: replaces masked patch embeddings

        # Stochastic depth rate grows linearly with depth unless uniform (Sec. 5: 40% for ViT-g, uniform officially).
        dpr = ([drop_path_rate] * depth if drop_path_uniform
               else torch.linspace(0, drop_path_rate, depth, device="cpu").tolist())  # cpu: also under meta device
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, dpr[i], init_values, ffn_layer,
                  attn_impl)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.set_attn_impl(attn_impl)
        self.init_weights()

    def init_weights(self):
        """Official init: trunc-normal(0.02) positions and Linear weights, zero Linear biases, N(0, 1e-6) [CLS] and
        registers, zero mask token; Conv2d and LayerNorm keep the PyTorch defaults."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_attn_impl(self, name):
        """Switch every block between "auto", "fused" and "explicit" attention."""
        assert name in ATTN_IMPLS, f"attn_impl must be one of {ATTN_IMPLS}, got {name!r}"
        self.attn_impl = name
        for blk in self.blocks:
            blk.attn.attn_impl = name

    def interpolate_pos_encoding(self, x, h, w):
        """Position embeddings for an h x w pixel image, as the official code computes them (bicubic).

        x: [B, 1+N, D] tokens (only N and dtype are used). With interpolate_offset != 0 the official code passes a
        scale factor (grid + offset) / M rather than an output size; that changes where bicubic samples, so we do
        the same to match released models bit for bit. The hub "_reg" models use offset 0 and antialias=True."""
        N = self.pos_embed.shape[1] - 1
        if x.shape[1] - 1 == N and h == w:
            return self.pos_embed
        M = int(math.sqrt(N))  # side of the square grid the embeddings were trained on
        assert M * M == N, f"pos_embed holds {N} patch positions, not a square grid"
        pos_embed = self.pos_embed.float()
        cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
        gh, gw = h // self.patch_size, w // self.patch_size
        if self.interpolate_offset:
            size_or_scale = dict(scale_factor=((gh + self.interpolate_offset) / M, (gw + self.interpolate_offset) / M))
        else:
            size_or_scale = dict(size=(gh, gw))
        D = patch_pos.shape[-1]
        patch_pos = F.interpolate(patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2),  # (1, D, M, M)
                                  mode="bicubic", antialias=self.interpolate_antialias, **size_or_scale)
        assert patch_pos.shape[-2:] == (gh, gw)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, D)  # (1, N', D), row-major
        return torch.cat((cls_pos, patch_pos), dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        """Image [B, 3, h, w] -> tokens [B, 1+R+N, D]; masks [B, N] bool (True = masked, iBOT) swap in mask_token."""
        B, _, h, w = x.shape
        x = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            # Before the position embedding, so the masked token still knows where it is (iBOT).
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)  # (B, 1+N, D)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(B, -1, -1), x[:, 1:]), dim=1)  # (B, 1+R+N, D)
        return x

    def forward_features(self, x, masks=None):
        """x [B, 3, h, w] -> dict of normalised [CLS] / register / patch tokens. A list of batches (e.g. global and
        local crops at two resolutions) runs one pass per resolution and returns a list of dicts."""
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks)]
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        x_norm = self.norm(x)
        R = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:1 + R],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, 1 + R:],  # (B, N, D)
            "x_prenorm": x,  # (B, 1+R+N, D)
            "masks": masks,
        }

    def forward(self, x, masks=None, is_training=False):
        """Inference: the normalised [CLS] token [B, D]. is_training=True returns forward_features (official API)."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return [o["x_norm_clstoken"] for o in out] if isinstance(out, list) else out["x_norm_clstoken"]

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Patch tokens of several blocks (official semantics): n an int = the last n blocks, or a list of block
        indices. norm applies the final LayerNorm; reshape gives [B, D, h/p, w/p] maps; registers are dropped."""
        take = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        assert len(outputs) == len(take), f"only {len(outputs)} / {len(take)} blocks found"
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        outputs = [out[:, 1 + self.num_register_tokens:] for out in outputs]  # (B, N, D)
        if reshape:
            B, _, h, w = x.shape
            p = self.patch_size
            outputs = [out.reshape(B, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous()  # (B, D, h/p, w/p)
                       for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def get_last_selfattention(self, x):
        """Softmax attention weights of the last block, [B, H, 1+R+N, 1+R+N] (token order: cls, registers, patches)."""
        x = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attn=True)[1]


# --------------------------------------------------------------------------------------------------------------------
# Projection head (DINO image-level and iBOT patch-level heads share this class)
# --------------------------------------------------------------------------------------------------------------------
class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row-wise norm), i.e. torch.nn.utils.weight_norm(dim=0)
    written out: same state-dict keys (weight_g [K, 1], weight_v [K, in]) without the deprecated hook machinery."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # official: weight_g filled with 1
        v = nn.Linear(in_features, out_features, bias=False).weight.detach().clone()  # PyTorch default init
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self):  # an attribute, as on the official weight-normed nn.Linear
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)  # (K, in)

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1), Linear to the bottleneck) -> l2 normalise -> weight-normalised prototypes."""

    def __init__(self, in_dim, out_dim=65536, use_bn=False, nlayers=3, hidden_dim=2048, bottleneck_dim=256,
                 mlp_bias=True):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers, dim = [], in_dim
            for _ in range(nlayers - 1):
                layers.append(nn.Linear(dim, hidden_dim, bias=mlp_bias))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                dim = hidden_dim
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)  # created after the init, as officially

    def bottleneck(self, x):
        """(B, in) -> (B, bottleneck) l2-normalised: what the prototypes score (train.py computes those scores in
        chunks of rows when they would not fit whole)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x):
        return self.last_layer(self.bottleneck(x))  # (B, K) cosine similarities to the prototypes, times g


# --------------------------------------------------------------------------------------------------------------------
# Model sizes: the one table of widths / depths / heads (head width 64), used by train.py and distill.py too
# --------------------------------------------------------------------------------------------------------------------
ARCHS = {  # paper Tab. 1 / App. B (official vits/vitb/vitl/vitg); vit_tiny* and vit_mini are this repo's CPU demos
    "vit_tiny": dict(embed_dim=192, depth=4, num_heads=6),  # 1.8M parameters (2.9M with both heads)
    "vit_tiny_d2": dict(embed_dim=192, depth=2, num_heads=6),  # distill.py CPU demo students: half the depth,
    "vit_mini": dict(embed_dim=96, depth=4, num_heads=3),  # or half the width of vit_tiny
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    # ViT-g/14 of the paper: 1536 wide, 40 deep, 24 heads, SwiGLU FFN with hidden width 4096
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


def vit_small(patch_size=14, **kw):
    return DinoVisionTransformer(patch_size=patch_size, **{**ARCHS["vit_small"], **kw})


def vit_base(patch_size=14, **kw):
    return DinoVisionTransformer(patch_size=patch_size, **{**ARCHS["vit_base"], **kw})


def vit_large(patch_size=14, **kw):
    return DinoVisionTransformer(patch_size=patch_size, **{**ARCHS["vit_large"], **kw})


def vit_giant2(patch_size=14, **kw):
    return DinoVisionTransformer(patch_size=patch_size, **{**ARCHS["vit_giant2"], **kw})


# --------------------------------------------------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------------------------------------------------
def backbone_state_dict(ckpt):
    """The backbone's state dict (block_chunks=0 key names) from any of the supported checkpoint layouts."""
    sd = ckpt.get("teacher", ckpt)  # training layouts keep the EMA teacher under "teacher"
    if any(k.startswith(("backbone.", "module.backbone.")) for k in sd):
        sd = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in sd.items()
              if k.removeprefix("module.").startswith("backbone.")}
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    # FSDP block chunks: blocks.<chunk>.<global index>.* -> blocks.<global index>.*
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}


def infer_model_args(sd):
    """Constructor kwargs read off the keys and shapes of a backbone state dict (num_heads assumes 64-wide heads,
    as in every released model; hub register models use antialiased offset-free interpolation)."""
    D = sd["cls_token"].shape[-1]
    p = sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(math.sqrt(sd["pos_embed"].shape[1] - 1))
    R = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    args = dict(img_size=grid * p, patch_size=p, in_chans=sd["patch_embed.proj.weight"].shape[1], embed_dim=D,
                depth=depth, num_heads=max(D // 64, 1), qkv_bias="blocks.0.attn.qkv.bias" in sd,
                proj_bias="blocks.0.attn.proj.bias" in sd, num_register_tokens=R,
                init_values=1.0 if "blocks.0.ls1.gamma" in sd else None)  # any value: gamma is overwritten
    if "blocks.0.mlp.w12.weight" in sd:
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        ratio = next((r for r in (4.0, hidden * 1.5 / D) if swiglu_hidden_dim(int(D * r)) == hidden), None)
        if ratio is None:
            raise ValueError(f"SwiGLU hidden width {hidden} is not produced by any mlp_ratio for width {D}")
        args.update(ffn_layer="swiglufused", mlp_ratio=ratio, ffn_bias="blocks.0.mlp.w12.bias" in sd)
    else:
        args.update(ffn_layer="mlp", mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
                    ffn_bias="blocks.0.mlp.fc1.bias" in sd)
    if R:
        args.update(interpolate_antialias=True, interpolate_offset=0.0)
    return args


EXPECTED_CHECKPOINT = ("a ViT backbone: a released hub .pth, a teacher_backbone.pth or <student>_backbone.pth, "
                       "or a train.py checkpoint.pth")


def check_is_backbone(path, ckpt):
    """A clear error for files torch.load reads that hold no backbone (a tensor, distill.py's checkpoint, a
    head-only or optimizer-only dict), naming what was found, instead of a KeyError deep in the loader."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a state dict; expected {EXPECTED_CHECKPOINT}")
    if "students" in ckpt:
        names = [s.get("name") for s in ckpt["students"] if isinstance(s, dict)]
        raise ValueError(f"{path} is a distill.py checkpoint (students {names}): evaluate "
                         f"<output_dir>/<student>_backbone.pth instead")
    try:
        sd = backbone_state_dict(ckpt)
    except (AttributeError, TypeError):  # keys that are not strings, a "teacher" that is not a dict
        sd = {}
    if not all(isinstance(sd.get(k), torch.Tensor) for k in ("cls_token", "pos_embed", "patch_embed.proj.weight")):
        found = sorted(map(str, ckpt))[:6]
        raise ValueError(f"{path} has no ViT backbone weights (no cls_token / pos_embed / patch_embed; top-level "
                         f"keys {found}{' ...' if len(ckpt) > 6 else ''}); expected {EXPECTED_CHECKPOINT}")


def load_model(path, map_location="cpu"):
    """Backbone from (a) a released hub .pth (bare state dict; optional sidecar <stem>.json with the kwargs),
    (b) an official training checkpoint {"teacher": {"backbone.<key>": ...}} (FSDP block chunks remapped), or
    (c) a train.py checkpoint (layout (b) plus "model_args"). Returns the model in eval mode; any key mismatch
    is an error that lists the missing and unexpected keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (expected {EXPECTED_CHECKPOINT})")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (or, before 1.6, a pickle)
        raise ValueError(f"{path} is not a PyTorch checkpoint (it starts with {head!r}, not a zip archive); "
                         f"expected {EXPECTED_CHECKPOINT}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip, pickle and torch each raise their own types for a damaged file
        first_line = (str(e).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"{path} could not be read by torch.load ({type(e).__name__}: {first_line}); "
                         f"expected {EXPECTED_CHECKPOINT}") from e
    check_is_backbone(path, ckpt)
    model_args = ckpt.get("model_args")
    sidecar = path.with_suffix(".json")
    if model_args is None and sidecar.exists():
        model_args = json.loads(sidecar.read_text())
        model_args = model_args.get("model_args", model_args)
    sd = backbone_state_dict(ckpt)
    if model_args is None:
        model_args = infer_model_args(sd)
    known = inspect.signature(DinoVisionTransformer).parameters
    ignored = sorted(set(model_args) - set(known))  # e.g. official config extras: block_chunks, repo, commit
    if ignored:
        print(f"load_model: ignoring non-constructor entries of model_args: {ignored}")
    model = DinoVisionTransformer(**{k: v for k, v in model_args.items() if k in known})
    model_keys, ckpt_keys = set(model.state_dict()), set(sd)
    missing, unexpected = sorted(model_keys - ckpt_keys), sorted(ckpt_keys - model_keys)
    if missing or unexpected:
        def listed(keys):  # one line even when a whole block is missing
            return f"{keys[:6]}" + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        raise RuntimeError(f"checkpoint {path} does not match the model built from its model_args: "
                           f"missing keys: {listed(missing)}; unexpected keys: {listed(unexpected)}")
    model.load_state_dict(sd, strict=True)  # also rejects shape mismatches
    return model.eval()


# --------------------------------------------------------------------------------------------------------------------
# Smoke run
# --------------------------------------------------------------------------------------------------------------------
def smoke():
    """Build a tiny ViT and head, run a masked forward, print the output shapes and parameter counts."""
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4,
                                  num_register_tokens=4, init_values=1e-5)
    head = DINOHead(64, out_dim=128, hidden_dim=96, bottleneck_dim=32)
    x = torch.randn(2, 3, 56, 56)
    masks = torch.rand(2, 16) < 0.5
    out = model.forward_features(x, masks=masks)
    for k, v in out.items():
        print(f"{k:20s} {tuple(v.shape)}")
    print(f"head output         {tuple(head(out['x_norm_clstoken']).shape)}")
    print(f"last self-attention {tuple(model.get_last_selfattention(x).shape)}")
    with torch.device("meta"):  # count parameters of the full-size models without allocating them
        full_size = [(f.__name__, f()) for f in (vit_small, vit_base, vit_large, vit_giant2)]
    for name, m in [("tiny ViT", model), ("tiny DINOHead", head)] + full_size:
        print(f"{name:14s} {sum(p.numel() for p in m.parameters()) / 1e6:9.2f} M parameters")


def main(argv=None):
    argparse.ArgumentParser(prog="model.py", description=__doc__.split("\n\n")[0],
                            epilog="The CPU attention benchmark is `python bench.py attention`.").parse_args(argv)
    smoke()


if __name__ == "__main__":
    main()
