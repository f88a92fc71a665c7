#!/usr/bin/env python3
"""Independent NumPy (float64) reference of the contrastive model of docs/model.md §3.

Written from docs/model.md §3 and the documented semantics of Hugging Face's `CLIPModel` (its
config fields and parameter names, pre-LN encoder layers, quick_gelu, the class token and
`post_layernorm`, end-token pooling, bias-free projections, logits = exp(logit_scale)·cosine,
the symmetric contrastive loss), not from Tessera's Rust code nor from `transformers`' source.

Given a Hugging Face CLIP directory (`config.json`, `model.safetensors`), the inputs
(`input_ids` [B, S] integers, `pixel_values` [B, C, H, W] already normalised) and Tessera's
outputs in the layout of `trainer debug-state` (docs/model.md §4: `text_embeds`, `image_embeds`,
`logits_per_image`, `loss`, `grad.<name>`), it recomputes the forward pass and the loss and
compares, then checks sampled gradient entries against float64 central differences of the loss.

Exits 0 when everything agrees, 1 naming the first mismatches.
"""

import argparse
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file

LN_EPS = 1e-5
_erf = np.vectorize(math.erf)


def layer_norm(x, g, b):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPS) * g + b


def activation(name, u):
    if name == "quick_gelu":
        return u / (1.0 + np.exp(-1.702 * u))
    if name == "gelu":
        return 0.5 * u * (1.0 + _erf(u / math.sqrt(2.0)))
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
    raise SystemExit(f"unsupported hidden_act {name}")


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def attention(x, w, p, heads, causal):
    """Multi-head self-attention over x [B, T, C] with separate q/k/v/out projections."""
    bsz, t, c = x.shape
    hd = c // heads

    def split(y):
        return y.reshape(bsz, t, heads, hd).transpose(0, 2, 1, 3)  # [B, NH, T, hd]

    q = split(linear(x, w[p + "q_proj.weight"], w[p + "q_proj.bias"]))
    k = split(linear(x, w[p + "k_proj.weight"], w[p + "k_proj.bias"]))
    v = split(linear(x, w[p + "v_proj.weight"], w[p + "v_proj.bias"]))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((t, t), dtype=bool)), s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    a = e / e.sum(axis=-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(bsz, t, c)
    return linear(o, w[p + "out_proj.weight"], w[p + "out_proj.bias"])


def encoder(x, w, prefix, cfg, causal):
    for l in range(cfg["num_hidden_layers"]):
        p = f"{prefix}.encoder.layers.{l}."
        h = layer_norm(x, w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"])
        x = x + attention(h, w, p + "self_attn.", cfg["num_attention_heads"], causal)
        h = layer_norm(x, w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"])
        h = activation(cfg["hidden_act"], linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]))
        x = x + linear(h, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
    return x


def text_features(ids, w, cfg):
    s = ids.shape[1]
    x = w["text_model.embeddings.token_embedding.weight"][ids]
    x = x + w["text_model.embeddings.position_embedding.weight"][:s]
    x = encoder(x, w, "text_model", cfg, causal=True)
    # The pooled position: the first end token; legacy configs (eos_token_id 2) take the first
    # position of the largest id.
    if cfg["eos_token_id"] == 2:
        end = ids.argmax(axis=1)
    else:
        end = (ids == cfg["eos_token_id"]).argmax(axis=1)
    pooled = x[np.arange(len(ids)), end]
    pooled = layer_norm(
        pooled, w["text_model.final_layer_norm.weight"], w["text_model.final_layer_norm.bias"]
    )
    return linear(pooled, w["text_projection.weight"])


def image_features(px, w, cfg):
    bsz, ch, h, wd = px.shape
    p = cfg["patch_size"]
    gy, gx = h // p, wd // p
    kernel = w["vision_model.embeddings.patch_embedding.weight"]  # [C, ch, P, P]
    # Stride-P convolution without bias: each non-overlapping patch dotted with each filter.
    blocks = px.reshape(bsz, ch, gy, p, gx, p)
    patches = np.einsum("bcyixj,dcij->byxd", blocks, kernel).reshape(bsz, gy * gx, -1)
    cls = np.broadcast_to(w["vision_model.embeddings.class_embedding"], (bsz, 1, patches.shape[2]))
    x = np.concatenate([cls, patches], axis=1) + w["vision_model.embeddings.position_embedding.weight"]
    x = layer_norm(x, w["vision_model.pre_layrnorm.weight"], w["vision_model.pre_layrnorm.bias"])
    x = encoder(x, w, "vision_model", cfg, causal=False)
    pooled = layer_norm(
        x[:, 0], w["vision_model.post_layernorm.weight"], w["vision_model.post_layernorm.bias"]
    )
    return linear(pooled, w["visual_projection.weight"])


def forward(w, ids, px, text_cfg, vision_cfg):
    t = text_features(ids, w, text_cfg)
    i = image_features(px, w, vision_cfg)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    i = i / np.linalg.norm(i, axis=1, keepdims=True)
    logits_per_text = math.exp(float(w["logit_scale"].reshape(()))) * t @ i.T
    logits_per_image = logits_per_text.T

    def ce(logits):
        m = logits.max(axis=1, keepdims=True)
        lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        return (lse - np.diag(logits)).mean()

    loss = 0.5 * (ce(logits_per_text) + ce(logits_per_image))
    return t, i, logits_per_image, loss


def tower_config(cfg, name, defaults):
    out = dict(defaults)
    out.update(cfg.get(name) or {})
    out.update(cfg.get(name + "_dict") or {})
    return out


TEXT_DEFAULTS = {"hidden_act": "quick_gelu", "eos_token_id": 2}
VISION_DEFAULTS = {"hidden_act": "quick_gelu"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="Hugging Face CLIP directory")
    ap.add_argument("--inputs", required=True, help="input_ids and pixel_values")
    ap.add_argument("--outputs", required=True, help="Tessera's outputs (debug-state layout)")
    ap.add_argument("--fd-samples", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with open(f"{args.dir}/config.json") as f:
        cfg = json.load(f)
    text_cfg = tower_config(cfg, "text_config", TEXT_DEFAULTS)
    vision_cfg = tower_config(cfg, "vision_config", VISION_DEFAULTS)
    w = {
        k: v.astype(np.float64)
        for k, v in load_file(f"{args.dir}/model.safetensors").items()
        if not k.endswith(".position_ids")
    }
    inputs = load_file(args.inputs)
    ids = inputs["input_ids"].astype(np.int64)
    px = inputs["pixel_values"].astype(np.float64)
    out = load_file(args.outputs)

    failures = []

    def compare(name, got, want, atol, rtol):
        got = np.asarray(got, dtype=np.float64).reshape(np.shape(want))
        err = np.abs(got - want)
        bad = err > atol + rtol * np.abs(want)
        print(f"{name}: max abs error {err.max():.3e}")
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            failures.append(f"{name}{list(idx)}: Tessera {got[idx]!r}, reference {want[idx]!r}")

    t, i, lpi, loss = forward(w, ids, px, text_cfg, vision_cfg)
    compare("text_embeds", out["text_embeds"], t, 1e-5, 1e-4)
    compare("image_embeds", out["image_embeds"], i, 1e-5, 1e-4)
    compare("logits_per_image", out["logits_per_image"], lpi, 1e-4, 1e-4)
    compare("loss", out["loss"], np.array([loss]), 1e-5, 1e-4)

    for k in w:
        g = out.get("grad." + k)
        if g is None:
            failures.append(f"grad.{k} missing")
        elif g.size != w[k].size:
            failures.append(f"grad.{k} has shape {g.shape}, parameter {w[k].shape}")

    # Sampled gradient entries: at least one per tensor (its largest), the rest at random.
    rng = np.random.default_rng(args.seed)
    names = sorted(w)
    picks = []
    for k in names:
        g = out["grad." + k].reshape(-1)
        picks.append((k, int(np.abs(g).argmax())))
    while len(picks) < args.fd_samples:
        k = names[rng.integers(len(names))]
        picks.append((k, int(rng.integers(w[k].size))))
    eps = 1e-4
    worst = 0.0
    for k, j in picks:
        orig = w[k].reshape(-1)[j]
        w[k].reshape(-1)[j] = orig + eps
        lp = forward(w, ids, px, text_cfg, vision_cfg)[3]
        w[k].reshape(-1)[j] = orig - eps
        lm = forward(w, ids, px, text_cfg, vision_cfg)[3]
        w[k].reshape(-1)[j] = orig
        fd = (lp - lm) / (2 * eps)
        got = float(out["grad." + k].reshape(-1)[j])
        err = abs(got - fd)
        worst = max(worst, err)
        if err > 1e-5 + 2e-3 * abs(fd):
            failures.append(f"grad.{k}[{j}]: Tessera {got!r}, central difference {fd!r}")
    print(f"gradients ({len(picks)} entries): max abs error {worst:.3e}")

    if failures:
        print("MISMATCH:\n  " + "\n  ".join(failures[:20]))
        return 1
    print("all checks agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
