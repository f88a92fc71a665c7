#!/usr/bin/env python3
"""PyTorch peer of `cargo run --release -p trainer --example bench_dvae`: one dVAE training step
with OpenAI's own `dall_e.Encoder` / `dall_e.Decoder` modules, eager mode, fp32, on the CPU.

Same work as the Rust benchmark: 64×64 images, n_hid 64, n_blk_per_group 1, K 512, decoder n_init
64, batch 8; Gumbel noise, softmax((logits + g)/τ), decoder, logit-Laplace NLL (ε = 0.1) + β·KL to
the uniform prior (docs/model.md §2), backward, AdamW. Prints one JSON line like the Rust benchmark.

Needs torch and the `dall_e` package (`pip install torch DALL-E`); not part of the test
requirements. Run it back to back with the Rust benchmark on a quiet machine:

    python3 tools/bench_pytorch_dvae.py --threads 2
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from dall_e import Decoder, Encoder

EPS = 0.1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(5)
    batch, res, k = 8, 64, 512
    # dall_e initialises in place, which `requires_grad=True` forbids: turn gradients on after.
    enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=k, use_mixed_precision=False)
    dec = Decoder(n_init=64, n_hid=64, n_blk_per_group=1, vocab_size=k,
                  use_mixed_precision=False)
    params = list(enc.parameters()) + list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    assert sum(p.numel() for p in params) == 2788646, "not the Rust benchmark's layout"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    images = torch.rand(batch, 3, res, res)
    tau, beta = 1.0, 0.0
    times, loss = [], 0.0
    for step in range(args.steps + 2):
        t0 = time.perf_counter()
        x = (1 - 2 * EPS) * images + EPS
        logits = enc(x)
        u = torch.rand_like(logits).clamp_min(torch.finfo(torch.float32).tiny)
        g = -torch.log(-torch.log(u))
        y = F.softmax((logits + g) / tau, dim=1)
        stats = dec(y)
        mu, ln_b = stats[:, :3], stats[:, 3:]
        b = torch.exp(ln_b)
        nll = (math.log(2.0) + ln_b + torch.log(x * (1 - x))
               + torch.abs(torch.logit(x) - mu) / b).sum()
        logq = F.log_softmax(logits, dim=1)
        kl = (logq.exp() * logq).sum() + math.log(k) * batch * logits.shape[2] * logits.shape[3]
        total = (nll + beta * kl) / (batch * 3 * res * res)
        opt.zero_grad(set_to_none=False)
        total.backward()
        opt.step()
        loss = float(total)
        if step >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    print(json.dumps({
        "bench": "dvae-pytorch", "torch": torch.__version__, "threads": args.threads,
        "batch": batch, "resolution": res, "steps": args.steps,
        "step_ms": round(ms, 2), "step_ms_min": round(min(times), 2),
        "images_per_s": round(batch / (ms / 1e3), 1), "loss": loss,
    }))


if __name__ == "__main__":
    main()
