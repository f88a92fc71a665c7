#!/usr/bin/env python3
"""PyTorch eager baseline for Tessera's sampling (trainer/examples/bench_sample.rs): image tokens
per second of autoregressive generation with the transformer of tools/bench_pytorch.py (the same
model: embeddings, pre-LN blocks with a fused qkv, dense attention under the row / column / conv
masks, GELU(tanh) MLP, ln_f, head), under torch.inference_mode().

Two loops, written as a PyTorch user would write them:
  naive     every new image token runs the model over the whole prefix (caption + the image
            tokens so far) and reads the last position's image logits (the loop of
            dalle-pytorch's generate_images without a cache). Its cost grows with the prefix, so
            the whole generation is estimated from one timed step at every --stride-th prefix
            length (each counted --stride times); --stride 1 times every step.
  kv_cache  the caption in one forward pass that fills per-layer key/value tensors, then one
            position per step attending over the cache under its mask row.

Each sequence's next token is drawn with torch.multinomial from the softmax of its logits.
--dtype bf16 casts the model (and so the activations and the caches) to bfloat16, as a PyTorch
user would for faster CPU inference; the softmax of the logits is taken in f32.

    python tools/bench_pytorch_sample.py [--size small] [--batch 8] [--runs 3] [--stride 16]
        [--mode naive|kv_cache|both] [--threads 2] [--dtype fp32|bf16]

One JSON line per mode: seconds for all B × G² image tokens (median of --runs after a warm-up
for kv_cache; the estimate for naive) and tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pytorch import SIZES, Transformer, random_batch  # noqa: E402


def attend(attn, h, forbidden, cache=None, start=0):
    """The attention of one block on h [B, n, d] at positions start..start+n; with a cache
    (k, v tensors [B, heads, T, dh]) the new keys and values are written into it first."""
    B, n, d = h.shape
    qkv = attn.qkv(h).view(B, n, 3, attn.h, attn.dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    end = start + n
    if cache is not None:
        cache[0][:, :, start:end] = k
        cache[1][:, :, start:end] = v
        k, v = cache[0][:, :, :end], cache[1][:, :, :end]
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(attn.dh))
    s = s.masked_fill(forbidden[start:end, :end], float("-inf"))
    y = torch.softmax(s, dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, n, d))


def embed(model, text, image, start_image):
    """Embeddings of the caption (when given) and of image tokens from grid cell start_image."""
    parts = []
    if text is not None:
        parts.append(model.text_emb(text) + model.text_pos(model.pos_t))
    n = image.shape[1]
    if n:
        r = model.pos_r[start_image : start_image + n]
        c = model.pos_c[start_image : start_image + n]
        parts.append(model.image_emb(image) + model.image_row(r) + model.image_col(c))
    return torch.cat(parts, dim=1)


def run_blocks(model, x, start, caches=None):
    for l, blk in enumerate(model.blocks):
        cache = caches[l] if caches is not None else None
        x = x + attend(blk.attn, blk.ln_1(x), blk.attn.forbidden, cache, start)
        x = x + blk.mlp(blk.ln_2(x))
    return model.ln_f(x)


def image_logits(model, h_last):
    return F.linear(h_last, model.head.weight[model.Vt + model.Tt :])


def draw(logits, gen):
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=gen)


def naive_step(model, text, image_so_far):
    h = run_blocks(model, embed(model, text, image_so_far, 0), 0)
    return image_logits(model, h[:, -1])


def generate_cached(model, text, gen):
    B, Tt = text.shape
    G2 = model.G * model.G
    T = Tt + G2
    blk0 = model.blocks[0].attn
    dtype = model.head.weight.dtype
    caches = [
        (torch.empty(B, blk0.h, T, blk0.dh, dtype=dtype), torch.empty(B, blk0.h, T, blk0.dh, dtype=dtype))
        for _ in model.blocks
    ]
    h = run_blocks(model, embed(model, text, text.new_empty(B, 0), 0), 0, caches)
    logits = image_logits(model, h[:, -1])
    out = torch.empty(B, G2, dtype=torch.long)
    for i in range(G2):
        tok = draw(logits, gen)
        out[:, i : i + 1] = tok
        if i + 1 < G2:
            h = run_blocks(model, embed(model, None, tok, i), Tt + i, caches)
            logits = image_logits(model, h[:, -1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--mode", default="both", choices=["naive", "kv_cache", "both"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    Tt, Vt, G, Vi, d, h, L, _ = SIZES[args.size]
    torch.manual_seed(1)
    model = Transformer(Tt, Vt, G, Vi, d, h, L, "masked_softmax").eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(7)
    B = args.batch
    text, image = random_batch(gen, B, Tt, Vt, G, Vi)
    G2 = G * G
    common = {"impl": "pytorch-eager", "size": args.size, "batch": B, "image_tokens": G2,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype}
    with torch.inference_mode():
        if args.mode in ("kv_cache", "both"):
            times = []
            for run in range(args.runs + 1):
                t0 = time.perf_counter()
                out = generate_cached(model, text, gen)
                if run > 0:
                    times.append(time.perf_counter() - t0)
            assert out.shape == (B, G2)
            secs = statistics.median(times)
            print(json.dumps({**common, "mode": "kv_cache", "runs": args.runs,
                              "seconds": round(secs, 3), "seconds_min": round(min(times), 3),
                              "tokens_per_s": round(B * G2 / secs)}), flush=True)
        if args.mode in ("naive", "both"):
            naive_step(model, text, image[:, :1])  # warm-up
            total = 0.0
            stride = max(args.stride, 1)
            for i in range(0, G2, stride):
                t0 = time.perf_counter()
                logits = naive_step(model, text, image[:, :i])
                draw(logits, gen)
                total += (time.perf_counter() - t0) * min(stride, G2 - i)
            print(json.dumps({**common, "mode": "naive", "stride": stride,
                              "seconds_estimated": round(total, 1),
                              "tokens_per_s": round(B * G2 / total, 1)}), flush=True)


if __name__ == "__main__":
    main()
