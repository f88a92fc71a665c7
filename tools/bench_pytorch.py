#!/usr/bin/env python3
"""PyTorch eager baseline for Tessera's stage-2 transformer training step (CPU or GPU).

A plain PyTorch implementation of the model of docs/model.md §1, written the way a PyTorch user
would: nn.Embedding tables, pre-LN blocks with a fused qkv nn.Linear, DENSE attention with one
precomputed boolean T×T mask per layer (row / column / conv layouts), a 4d GELU(tanh) MLP, ln_f
and a bias-free head over all positions. The loss is 1/8 · CE(text) + 7/8 · CE(image) as in the
spec. AdamW(lr 1e-4, betas (0.9, 0.96), eps 1e-8, weight decay 0.045) with clip_grad_norm_(4.0).

Two attention variants are timed:
  masked_softmax  q·kᵀ/√dh, masked_fill(-inf), softmax, ·v (the plain math)
  sdpa            F.scaled_dot_product_attention(q, k, v, attn_mask=<bool mask>)

    python tools/bench_pytorch.py --size tiny|small|paperseq|paperstack|all \
        [--attn masked_softmax|sdpa|both] [--device cpu|cuda] [--precision fp32|fp16]

`paperstack` is the paper-shaped layer stack of the GPU check (d 2048, 32 heads, 24 layers,
256 text + 32×32 image tokens, batch 4); it is meant for a GPU. `--precision fp16` (CUDA only) is
PyTorch's usual mixed precision: autocast to fp16 with one global loss scale (GradScaler), fp32
weights and AdamW. On CUDA the clock reads after torch.cuda.synchronize().

Timing matches trainer/examples/bench_transformer.rs: two warm-up steps, then the median (and
minimum) of --steps (default 5) full steps (zero_grad, forward, loss, backward, clip, step).
One JSON line per size and attention variant, with tokens per second.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# name: (Tt, Vt, G, Vi, d, h, L, batch); the conv kernel is 11 everywhere (K = 5).
SIZES = {
    "tiny": (32, 1024, 8, 512, 256, 8, 8, 16),
    "small": (64, 4096, 16, 1024, 384, 6, 12, 8),
    "paperseq": (256, 16384, 32, 8192, 256, 4, 4, 2),
    "paperstack": (256, 16384, 32, 8192, 2048, 32, 24, 4),
}
CONV_KERNEL = 11


def layout_of(layer: int, layers: int) -> str:
    if layer == layers - 1:
        return "conv"
    if layer % 4 == 1:
        return "column"
    return "row"


def allowed_mask(kind: str, Tt: int, G: int, kernel: int = CONV_KERNEL) -> torch.Tensor:
    """Boolean [T, T], True where query p may attend key q (docs/model.md §1, Masks)."""
    T = Tt + G * G
    p = torch.arange(T).view(T, 1)
    q = torch.arange(T).view(1, T)
    causal = q <= p
    # Image coordinates (only meaningful where the index is >= Tt).
    i = (p - Tt).clamp(min=0)
    j = (q - Tt).clamp(min=0)
    ri, ci = i // G, i % G
    rj, cj = j // G, j % G
    if kind == "row":
        img = (i - j) <= G
    elif kind == "column":
        img = cj == ci
    elif kind == "conv":
        k = (kernel - 1) // 2
        img = ((rj - ri).abs() <= k) & ((cj - ci).abs() <= k)
    else:
        raise ValueError(kind)
    text_query = p < Tt
    text_key = q < Tt
    allowed = causal & (text_query | text_key | img)
    return allowed


class Attention(nn.Module):
    def __init__(self, d: int, h: int, allowed: torch.Tensor, variant: str):
        super().__init__()
        self.h = h
        self.dh = d // h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.variant = variant
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("forbidden", ~allowed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, h, T, dh]
        if self.variant == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)
        else:
            s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dh))
            s = s.masked_fill(self.forbidden, float("-inf"))
            y = torch.softmax(s, dim=-1) @ v
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, h: int, allowed: torch.Tensor, variant: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.attn = Attention(d, h, allowed, variant)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, Tt, Vt, G, Vi, d, h, L, variant):
        super().__init__()
        self.Tt, self.Vt, self.G, self.Vi = Tt, Vt, G, Vi
        self.text_emb = nn.Embedding(Vt + Tt, d)
        self.text_pos = nn.Embedding(Tt, d)
        self.image_emb = nn.Embedding(Vi, d)
        self.image_row = nn.Embedding(G, d)
        self.image_col = nn.Embedding(G, d)
        masks = {kind: allowed_mask(kind, Tt, G) for kind in ("row", "column", "conv")}
        self.blocks = nn.ModuleList(
            Block(d, h, masks[layout_of(l, L)], variant) for l in range(L)
        )
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, Vt + Tt + Vi, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.register_buffer("pos_t", torch.arange(Tt), persistent=False)
        self.register_buffer("pos_r", torch.arange(G * G) // G, persistent=False)
        self.register_buffer("pos_c", torch.arange(G * G) % G, persistent=False)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        xt = self.text_emb(text) + self.text_pos(self.pos_t)
        xi = self.image_emb(image) + self.image_row(self.pos_r) + self.image_col(self.pos_c)
        x = torch.cat([xt, xi], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, Vt+Tt+Vi]

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        z = self(text, image)
        Tt, Vt = self.Tt, self.Vt
        zt = z[:, : Tt - 1, : Vt + Tt]
        zi = z[:, Tt - 1 : -1, Vt + Tt :]
        lt = F.cross_entropy(zt.reshape(-1, zt.shape[-1]), text[:, 1:].reshape(-1))
        li = F.cross_entropy(zi.reshape(-1, zi.shape[-1]), image.reshape(-1))
        return lt / 8 + li * 7 / 8


def random_batch(gen, B, Tt, Vt, G, Vi):
    """Captions of 4..Tt tokens in [0, Vt), then the per-position padding ids Vt + i."""
    text = torch.randint(0, Vt, (B, Tt), generator=gen)
    lens = torch.randint(4, Tt + 1, (B, 1), generator=gen)
    pos = torch.arange(Tt).view(1, Tt)
    text = torch.where(pos < lens, text, Vt + pos)
    image = torch.randint(0, Vi, (B, G * G), generator=gen)
    return text, image


def bench(size: str, variant: str, steps: int, device: str = "cpu", precision: str = "fp32") -> dict:
    Tt, Vt, G, Vi, d, h, L, B = SIZES[size]
    torch.manual_seed(1)
    dev = torch.device(device)
    model = Transformer(Tt, Vt, G, Vi, d, h, L, variant).to(dev)
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.045
    )
    half = precision == "fp16"
    scaler = torch.amp.GradScaler("cuda", enabled=half)
    gen = torch.Generator().manual_seed(7)
    batches = [
        tuple(t.to(dev) for t in random_batch(gen, B, Tt, Vt, G, Vi)) for _ in range(steps + 2)
    ]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    loss = None
    for step, (text, image) in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=half):
            loss = model.loss(text, image)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        scaler.step(opt)
        scaler.update()
        sync()
        if step >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    step_ms = statistics.median(times)
    return {
        "impl": "pytorch-eager",
        "attn": variant,
        "size": size,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "precision": precision,
        "params": sum(p.numel() for p in model.parameters()),
        "batch": B,
        "seq_len": Tt + G * G,
        "steps": steps,
        "step_ms": round(step_ms, 2),
        "step_ms_min": round(min(times), 2),
        "tokens_per_s": round(B * (Tt + G * G) / step_ms * 1e3, 1),
        "loss": round(loss.item(), 5),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=[*SIZES, "all"])
    ap.add_argument("--attn", default="both", choices=["masked_softmax", "sdpa", "both"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    args = ap.parse_args()
    if args.precision == "fp16" and args.device != "cuda":
        ap.error("--precision fp16 needs --device cuda (autocast to fp16 is a GPU recipe)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: PyTorch sees no GPU")
    torch.set_num_threads(args.threads)
    sizes = list(SIZES) if args.size == "all" else [args.size]
    variants = ["masked_softmax", "sdpa"] if args.attn == "both" else [args.attn]
    for size in sizes:
        for variant in variants:
            row = bench(size, variant, max(args.steps, 1), args.device, args.precision)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
