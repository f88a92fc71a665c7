#!/usr/bin/env python3
"""Screens dVAE training recipes outside Tessera: `configs/dvae-cpu.yaml`'s run (OpenAI's own
`dall_e.Encoder` / `dall_e.Decoder` at the config's sizes, PyTorch's default initialisation as
Tessera draws it, Gumbel-softmax with τ 1 → 1/16 by cosine over the run, β 0 → 6.6 by cosine
over a quarter of it, the logit-space Gaussian likelihood, AdamW 1e-3 with a cosine to 1/80 of
it, 8 images per update) in PyTorch, with the changes that docs/dvae-training.md ("Fifth round")
measured:

- `--branch-gain unit`: the residual branches at post_gain 1 (Tessera's
  `relaxation.branch_gain: unit` trains the same model in OpenAI's parameterisation);
- `--kl batch`: the KL of the batch's average code distribution to the uniform prior instead of
  each position's (not in Tessera yet);
- `--decoder-input-gain G`: the decoder's input convolution drawn G times larger;
- `--sigma S`: the Gaussian's standard deviation in logit space.

Every 500 updates (and at the end) it prints the held-out PSNR and the number of distinct codes
of argmax-code reconstructions, as `trainer reconstruct` measures them, and writes the first 16
held-out images above their reconstructions to `--out`.

    data-prep synth --count 4096 --resolution 64 --out /tmp/synth
    data-prep synth --count 256 --resolution 64 --seed 777 --out /tmp/heldout
    python3 tools/dvae_recipe.py --train '/tmp/synth/*/*.png' --heldout '/tmp/heldout/*/*.png' \\
        --branch-gain unit --kl batch --decoder-input-gain 22.627417 --steps 4000

Needs torch, numpy, pillow and the `dall_e` package (`pip install torch DALL-E requests attrs`);
not part of the test requirements. About 6 to 12 minutes per 2,000 updates on one core.
"""

import argparse
import glob
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from dall_e import Decoder, Encoder

from dvae_memorise import EPS, torch_default_init


def load(pattern):
    files = sorted(glob.glob(pattern))
    if not files:
        raise SystemExit(f"{pattern}: no PNG files match")
    pixels = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
    return torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def cosine(t, n, start, end):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t, n) / n))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="glob of the training PNGs")
    ap.add_argument("--heldout", required=True, help="glob of the held-out PNGs (first 256 used)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--tau-steps", type=int, help="length of τ's cosine (default: --steps)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n-hid", type=int, default=32)
    ap.add_argument("--beta", type=float, default=6.6)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--kl", choices=["position", "batch"], default="position")
    ap.add_argument("--branch-gain", choices=["openai", "unit"], default="openai")
    ap.add_argument("--decoder-input-gain", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="dvae_recipe.png")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train, heldout = load(a.train), load(a.heldout)[:256]
    k = 512
    enc = Encoder(n_hid=a.n_hid, n_blk_per_group=1, vocab_size=k, use_mixed_precision=False)
    dec = Decoder(n_init=64, n_hid=a.n_hid, n_blk_per_group=1, vocab_size=k,
                  use_mixed_precision=False)
    modules = list(enc.modules()) + list(dec.modules())
    torch_default_init(modules)  # PyTorch's default, as Tessera's init_params
    for m in modules:
        if a.branch_gain == "unit" and hasattr(m, "post_gain"):
            m.post_gain = 1.0
    with torch.no_grad():
        dec.blocks.input.w.mul_(a.decoder_input_gain)
    params = list(enc.parameters()) + list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    tau_steps, beta_steps = a.tau_steps or a.steps, max(a.steps // 4, 1)

    def evaluate():
        with torch.no_grad():
            sq, codes, recs = 0.0, set(), []
            for i in range(0, len(heldout), 32):
                x = heldout[i:i + 32]
                am = enc((1 - 2 * EPS) * x + EPS).argmax(1)
                codes |= set(am.unique().tolist())
                mu = dec(F.one_hot(am, k).permute(0, 3, 1, 2).float())[:, :3]
                rec = ((torch.sigmoid(mu) - EPS) / (1 - 2 * EPS)).clamp(0, 1)
                sq += float(((rec - x) ** 2).sum())
                recs.append(rec)
            mse = sq / heldout.numel()
            return -10 * math.log10(mse), len(codes), torch.cat(recs)

    gen = torch.Generator().manual_seed(a.seed + 1)
    start = time.time()
    for t in range(a.steps):
        tau = cosine(t, tau_steps, 1.0, 1 / 16)
        beta = cosine(t, beta_steps, 0.0, a.beta)
        for group in opt.param_groups:
            group["lr"] = cosine(t, a.steps, a.lr, a.lr / 80)
        x = (1 - 2 * EPS) * train[torch.randint(len(train), (a.batch,), generator=gen)] + EPS
        logits = enc(x)
        u = torch.rand(logits.shape, generator=gen).clamp_min(1e-20)
        y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
        mu = dec(y)[:, :3]
        nll = (0.5 * ((torch.logit(x) - mu) / a.sigma) ** 2).sum()
        log_q = F.log_softmax(logits, dim=1)
        q = log_q.exp()
        positions = logits.shape[0] * logits.shape[2] * logits.shape[3]
        if a.kl == "position":
            kl = (q * (log_q + math.log(k))).sum()
        else:
            q_bar = q.mean(dim=(0, 2, 3))
            kl = (q_bar * (q_bar.clamp_min(1e-30).log() + math.log(k))).sum() * positions
        loss = (nll + beta * kl) / x.numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (t + 1) % 500 == 0 or t + 1 == a.steps:
            psnr, n_codes, _ = evaluate()
            print(f"update {t + 1:5d}  loss {loss.item():.4f}  kl/position "
                  f"{kl.item() / positions:.3f}  tau {tau:.3f}  held-out PSNR {psnr:.2f} dB, "
                  f"{n_codes} codes  ({time.time() - start:.0f} s)", flush=True)
    _, _, recs = evaluate()
    top = torch.cat(list(heldout[:16]), dim=2)
    bottom = torch.cat(list(recs[:16]), dim=2)
    grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).numpy()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
