#!/usr/bin/env python3
"""Can OpenAI's dVAE modules memorise a handful of images? The experiment of docs/dvae-training.md
("Fourth round"), run with OpenAI's own `dall_e.Encoder` / `dall_e.Decoder` in PyTorch, outside
Tessera, so that what it shows is about the recipe and not about Tessera's code.

It trains the CPU config's shapes (n_hid 32, one block per group, K 512, n_init 64) on the PNGs
given, at every update the same batch, without Gumbel noise (τ = 1 unless `--tau`), β = 0, AdamW
(lr 1e-3, β2 0.999, weight decay 1e-4), PyTorch's default convolution initialisation (Tessera's),
and prints the pixel MSE / PSNR of the decoded mean and the number of distinct argmax codes every
20 updates. `--loss` picks the likelihood: `laplace` (the paper's logit-Laplace with a learnt
scale), `gaussian` (unit variance in logit space, Tessera's `relaxation.likelihood:
logit-gaussian`) or `pixel-mse`; `--bypass` feeds the encoder's logits to the decoder without the
softmax.

    data-prep synth --count 8 --resolution 64 --out /tmp/eight
    python3 tools/dvae_memorise.py --images '/tmp/eight/00000/*.png' --loss laplace
    python3 tools/dvae_memorise.py --images '/tmp/eight/00000/*.png' --loss gaussian --bypass

Needs torch, numpy, pillow and the `dall_e` package (`pip install torch DALL-E requests attrs`);
not part of the test requirements. `--out FILE.png` writes the images above their reconstructions.
"""

import argparse
import glob
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from dall_e import Decoder, Encoder

EPS = 0.1  # x' = (1 − 2ε)·x + ε, as docs/model.md §2


def torch_default_init(modules):
    """PyTorch's default Conv2d initialisation (Kaiming-uniform with a = √5, bias U(±1/√fan_in)),
    which Tessera's `Dvae::init_params` draws; `dall_e` draws N(0, 1/fan_in) and zero biases."""
    for m in modules:
        if type(m).__name__ != "Conv2d":
            continue
        w = torch.empty(m.w.shape)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
        with torch.no_grad():
            m.w.copy_(w)
            m.b.copy_(torch.empty(m.b.shape).uniform_(-bound, bound))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="glob of PNG files, all of one size")
    ap.add_argument("--loss", choices=["laplace", "gaussian", "pixel-mse"], default="laplace")
    ap.add_argument("--bypass", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    files = sorted(glob.glob(args.images))
    if not files:
        raise SystemExit(f"{args.images}: no PNG files match")
    pixels = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255 for f in files]
    images = torch.tensor(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    x = (1 - 2 * EPS) * images + EPS
    k = 512
    enc = Encoder(n_hid=32, n_blk_per_group=1, vocab_size=k, use_mixed_precision=False)
    dec = Decoder(n_init=64, n_hid=32, n_blk_per_group=1, vocab_size=k, use_mixed_precision=False)
    torch_default_init(list(enc.modules()) + list(dec.modules()))
    params = list(enc.parameters()) + list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    print(f"{len(files)} images {tuple(images.shape)}, loss {args.loss}, bypass {args.bypass}")

    for step in range(1, args.steps + 1):
        logits = enc(x)
        y = logits if args.bypass else F.softmax(logits / args.tau, dim=1)
        stats = dec(y)
        mu, ln_b = stats[:, :3], stats[:, 3:]
        recon = ((torch.sigmoid(mu) - EPS) / (1 - 2 * EPS)).clamp(0, 1)
        if args.loss == "laplace":
            nll = math.log(2.0) + ln_b + torch.log(x * (1 - x)) + (torch.logit(x) - mu).abs() / ln_b.exp()
            loss = nll.mean()
        elif args.loss == "gaussian":
            loss = (0.5 * (torch.logit(x) - mu) ** 2).mean()
        else:
            loss = ((torch.sigmoid(mu) - EPS) / (1 - 2 * EPS) - images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 20 == 0:
            mse = float((recon.detach() - images).pow(2).mean())
            codes = len(torch.unique(logits.argmax(1)))
            print(f"update {step:4d}  loss {loss.item():8.4f}  mse {mse:.5f}  "
                  f"psnr {-10 * math.log10(mse):5.2f} dB  codes {codes}", flush=True)
    if args.out:
        top = torch.cat(list(images), dim=2)
        bottom = torch.cat(list(recon.detach()), dim=2)
        grid = torch.cat([top, bottom], dim=1).permute(1, 2, 0).numpy()
        Image.fromarray((grid * 255).round().astype(np.uint8)).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
