#!/usr/bin/env python3
"""Independent NumPy (float64) reference of the stage-1 dVAE of docs/model.md §2.

Written from the spec and OpenAI's released `dall_e` Encoder/Decoder architecture, not from
Tessera's Rust code. Given the weights, the inputs (`images` [B,3,H,W] in [0,1], `tau` [1],
`beta` [1], optionally Gumbel `noise` [B,K,H/8,W/8], zero when absent) and Tessera's outputs
(`logits`, `stats`, `loss`, `nll`, `kl`, `grad.<name>`; or the `trainer debug-state` file of
docs/model.md §4, whose `encoder_logits` and `decoder_stats` stand for `logits` and `stats`), it
recomputes the forward pass and the loss and compares, then checks sampled gradient entries (and
one random direction) against float64 central differences of the loss. `--likelihood` picks the
pixels' likelihood (`relaxation.likelihood`: logit-laplace, the default, or logit-gaussian), `--kl`
the KL term (`relaxation.kl`: position, the default, or batch).

Exits 0 when everything agrees, 1 naming the first mismatches.
"""

import argparse
import sys

import numpy as np
from safetensors.numpy import load_file

EPS_PIXEL = 0.1  # x' = (1 - 2·ε)·x + ε
GROUP_COUNT = 4


def conv(x, w, b):
    """2-D convolution, stride 1, zero padding (k-1)/2, weights [out, in, k, k], by explicit
    loops over the kernel offsets."""
    n_out, n_in, kh, kw = w.shape
    assert kh == kw and kh % 2 == 1, w.shape
    assert x.shape[1] == n_in, (x.shape, w.shape)
    p = (kh - 1) // 2
    bsz, _, h, wd = x.shape
    xp = np.zeros((bsz, n_in, h + 2 * p, wd + 2 * p))
    xp[:, :, p : p + h, p : p + wd] = x
    out = np.zeros((bsz, n_out, h, wd))
    for di in range(kh):
        for dj in range(kw):
            patch = xp[:, :, di : di + h, dj : dj + wd]  # [B, in, H, W]
            out += np.einsum("oi,bihw->bohw", w[:, :, di, dj], patch)
    return out + b[None, :, None, None]


def relu(x):
    return np.maximum(x, 0.0)


def max_pool2(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def upsample2(x):
    return x.repeat(2, axis=2).repeat(2, axis=3)


def softmax(x, axis):
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


class Arch:
    """The parameter names and shapes of OpenAI's Encoder/Decoder for the given sizes."""

    def __init__(self, n_hid, n_blk, vocab, n_init, likelihood="logit-laplace", kl="position"):
        self.n_hid, self.n_blk, self.vocab, self.n_init = n_hid, n_blk, vocab, n_init
        self.likelihood = likelihood
        self.kl = kl
        self.post_gain = 1.0 / (GROUP_COUNT * n_blk) ** 2
        self.shapes = {}

        def add_conv(name, n_in, n_out, k):
            self.shapes[name + ".w"] = (n_out, n_in, k, k)
            self.shapes[name + ".b"] = (n_out,)

        def add_block(prefix, n_in, n_out, kernels):
            hid = n_out // 4
            if n_in != n_out:
                add_conv(prefix + ".id_path", n_in, n_out, 1)
            ins = [n_in, hid, hid, hid]
            outs = [hid, hid, hid, n_out]
            for i in range(4):
                add_conv(f"{prefix}.res_path.conv_{i + 1}", ins[i], outs[i], kernels[i])

        # Encoder.
        add_conv("encoder.blocks.input", 3, n_hid, 7)
        n_in = n_hid
        for g, mult in enumerate([1, 2, 4, 8], start=1):
            for i in range(1, n_blk + 1):
                add_block(f"encoder.blocks.group_{g}.block_{i}", n_in, mult * n_hid, [3, 3, 3, 1])
                n_in = mult * n_hid
        add_conv("encoder.blocks.output.conv", 8 * n_hid, vocab, 1)
        # Decoder.
        add_conv("decoder.blocks.input", vocab, n_init, 1)
        n_in = n_init
        for g, mult in enumerate([8, 4, 2, 1], start=1):
            for i in range(1, n_blk + 1):
                add_block(f"decoder.blocks.group_{g}.block_{i}", n_in, mult * n_hid, [1, 3, 3, 3])
                n_in = mult * n_hid
        add_conv("decoder.blocks.output.conv", n_hid, 6, 1)

    def block(self, p, prefix, x):
        idp = prefix + ".id_path"
        ident = conv(x, p[idp + ".w"], p[idp + ".b"]) if idp + ".w" in p else x
        h = x
        for i in range(1, 5):
            c = f"{prefix}.res_path.conv_{i}"
            h = conv(relu(h), p[c + ".w"], p[c + ".b"])
        return ident + self.post_gain * h

    def net(self, p, which, x):
        x = conv(x, p[f"{which}.blocks.input.w"], p[f"{which}.blocks.input.b"])
        for g in range(1, GROUP_COUNT + 1):
            for i in range(1, self.n_blk + 1):
                x = self.block(p, f"{which}.blocks.group_{g}.block_{i}", x)
            if g < GROUP_COUNT:
                x = max_pool2(x) if which == "encoder" else upsample2(x)
        out = f"{which}.blocks.output.conv"
        return conv(relu(x), p[out + ".w"], p[out + ".b"])

    def forward(self, p, images, noise, tau, beta):
        """Returns (logits, stats, loss, nll, kl) in float64."""
        xm = (1.0 - 2.0 * EPS_PIXEL) * images + EPS_PIXEL
        logits = self.net(p, "encoder", xm)
        y = softmax((logits + noise) / tau, axis=1)
        stats = self.net(p, "decoder", y)
        mu, lnb = stats[:, 0:3], stats[:, 3:6]
        b = np.exp(lnb)
        logit_x = np.log(xm / (1.0 - xm))
        if self.likelihood == "logit-gaussian":
            # −ln N(logit(x'); μ, 1) − ln |d logit(x') / dx'|; ln b is not read.
            nll = np.sum(
                0.5 * (logit_x - mu) ** 2 + 0.5 * np.log(2.0 * np.pi) + np.log(xm * (1.0 - xm))
            )
        else:
            nll = np.sum(
                np.log(2.0 * b) + np.log(xm * (1.0 - xm)) + np.abs(logit_x - mu) / b
            )
        q = softmax(logits, axis=1)
        if self.kl == "batch":
            # N·KL(q̄ ‖ uniform), q̄ the mean of q over the batch's N positions.
            q_bar = q.mean(axis=(0, 2, 3))
            n = q.shape[0] * q.shape[2] * q.shape[3]
            kl = n * np.sum(q_bar * np.log(self.vocab * q_bar))
        else:
            kl = np.sum(np.sum(q * np.log(q), axis=1) + np.log(self.vocab))
        bsz, _, h, w = images.shape
        loss = (nll + beta * kl) / (bsz * 3 * h * w)
        return logits, stats, loss, nll, kl


def kind_of(name):
    """The tensor kind used to make sure every kind is sampled at least once."""
    net = name.split(".")[0]
    if ".blocks.input." in name:
        k = "input"
    elif ".output." in name:
        k = "output"
    elif ".id_path." in name:
        k = "id_path"
    else:
        k = "res_conv"
    return f"{net}.{k}.{name.rsplit('.', 1)[1]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--outputs", required=True)
    ap.add_argument("--n-blk-per-group", type=int, required=True)
    ap.add_argument("--likelihood", choices=["logit-laplace", "logit-gaussian"],
                    default="logit-laplace")
    ap.add_argument("--kl", choices=["position", "batch"], default="position")
    ap.add_argument("--fd-samples", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    w32 = load_file(args.weights)
    inp = load_file(args.inputs)
    out = load_file(args.outputs)
    # The debug-state file (docs/model.md §4) names the two forward tensors differently.
    for short, long in [("logits", "encoder_logits"), ("stats", "decoder_stats")]:
        if short not in out and long in out:
            out[short] = out[long]
    p = {k: v.astype(np.float64) for k, v in w32.items()}

    n_hid = p["encoder.blocks.input.w"].shape[0]
    vocab = p["encoder.blocks.output.conv.w"].shape[0]
    n_init = p["decoder.blocks.input.w"].shape[0]
    arch = Arch(n_hid, args.n_blk_per_group, vocab, n_init, args.likelihood, args.kl)
    failures = []

    def fail(msg):
        failures.append(msg)

    # Names and shapes: exactly OpenAI's state-dict keys.
    if set(arch.shapes) != set(p):
        fail(
            f"parameter names differ: missing {sorted(set(arch.shapes) - set(p))}, "
            f"unexpected {sorted(set(p) - set(arch.shapes))}"
        )
    for name, shape in arch.shapes.items():
        if name in p and tuple(p[name].shape) != shape:
            fail(f"{name}: shape {tuple(p[name].shape)}, expected {shape}")
        g = "grad." + name
        if g not in out:
            fail(f"{g}: missing from the outputs")
        elif tuple(out[g].shape) != shape:
            fail(f"{g}: shape {tuple(out[g].shape)}, expected {shape}")
    if failures:
        report(failures)

    images = inp["images"].astype(np.float64)
    if "noise" in inp:
        noise = inp["noise"].astype(np.float64)
    else:
        b, _, h, w = images.shape
        noise = np.zeros((b, vocab, h // 8, w // 8))
    tau = float(inp["tau"].reshape(-1)[0])
    beta = float(inp["beta"].reshape(-1)[0])
    print(
        f"sizes: B={images.shape[0]} H=W={images.shape[2]} n_hid={n_hid} "
        f"n_blk_per_group={arch.n_blk} K={vocab} n_init={n_init} tau={tau:.7g} beta={beta:.7g}"
    )

    logits, stats, loss, nll, kl = arch.forward(p, images, noise, tau, beta)

    # Forward tensors.
    for name, ref in [("logits", logits), ("stats", stats)]:
        got = out[name].astype(np.float64)
        if got.shape != ref.shape:
            fail(f"{name}: shape {got.shape}, expected {ref.shape}")
            continue
        err = np.abs(got - ref)
        tol = 1e-4 + 1e-4 * np.abs(ref)
        print(f"{name}: max abs error {err.max():.3e} (max |ref| {np.abs(ref).max():.3e})")
        bad = np.argwhere(err > tol)
        for idx in bad[:5]:
            i = tuple(int(v) for v in idx)
            fail(f"{name}{list(i)}: rust {got[i]:.8g} reference {ref[i]:.8g}")
        if len(bad) > 5:
            fail(f"{name}: {len(bad)} entries out of tolerance in all")
    for name, ref in [("loss", loss), ("nll", nll), ("kl", kl)]:
        got = float(out[name].reshape(-1)[0])
        rel = abs(got - ref) / max(abs(ref), 1e-30)
        print(f"{name}: rust {got:.9g} reference {ref:.9g} relative error {rel:.3e}")
        if rel > 1e-5:
            fail(f"{name}: rust {got:.9g} reference {ref:.9g} (relative error {rel:.3e})")

    # Gradients: sampled entries against float64 central differences.
    def loss_with(name, idx, delta):
        old = p[name][idx]
        p[name][idx] = old + delta
        try:
            return arch.forward(p, images, noise, tau, beta)[2]
        finally:
            p[name][idx] = old

    rng = np.random.default_rng(args.seed)
    names = sorted(arch.shapes)
    by_kind = {}
    for n in names:
        by_kind.setdefault(kind_of(n), []).append(n)
    picks = [by_kind[k][rng.integers(len(by_kind[k]))] for k in sorted(by_kind)]
    while len(picks) < args.fd_samples:
        picks.append(names[rng.integers(len(names))])
    eps, atol, rtol = 1e-5, 1e-5, 2e-2
    checked = skipped = 0
    max_abs = max_rel = 0.0
    for name in picks:
        shape = arch.shapes[name]
        idx = tuple(int(rng.integers(s)) for s in shape)
        lp, lm = loss_with(name, idx, eps), loss_with(name, idx, -eps)
        fwd, bwd = (lp - loss) / eps, (loss - lm) / eps
        if abs(fwd - bwd) > 0.1 * max(abs(fwd), abs(bwd)) + atol:
            skipped += 1
            print(f"skip {name}{list(idx)}: kink, one-sided differences {fwd:.6g} / {bwd:.6g}")
            continue
        checked += 1
        fd = (lp - lm) / (2 * eps)
        got = float(out["grad." + name][idx])
        err = abs(got - fd)
        max_abs = max(max_abs, err)
        if abs(fd) > 1e-6:
            max_rel = max(max_rel, err / abs(fd))
        if err > atol + rtol * abs(fd):
            fail(f"grad.{name}{list(idx)}: rust {got:.8g} central difference {fd:.8g}")
    print(
        f"gradient entries: {checked} checked, {skipped} skipped at kinks; "
        f"max abs error {max_abs:.3e}, max relative error (|fd| > 1e-6) {max_rel:.3e}"
    )
    if skipped > 0.1 * len(picks):
        fail(f"{skipped} of {len(picks)} sampled gradient entries skipped at kinks (> 10%)")

    # One random ±1/√n direction through all parameters at once.
    total = sum(int(np.prod(s)) for s in arch.shapes.values())
    v = {n: rng.choice([-1.0, 1.0], size=arch.shapes[n]) / np.sqrt(total) for n in names}
    dot = sum(float(np.sum(out["grad." + n].astype(np.float64) * v[n])) for n in names)
    scale = sum(float(np.sum(np.abs(out["grad." + n].astype(np.float64) * v[n]))) for n in names)

    def loss_along(t):
        q = {n: p[n] + t * v[n] for n in names}
        return arch.forward(q, images, noise, tau, beta)[2]

    fd = (loss_along(eps) - loss_along(-eps)) / (2 * eps)
    print(f"direction: rust {dot:.8g} central difference {fd:.8g} error {abs(dot - fd):.3e}")
    if abs(dot - fd) > atol + rtol * scale:
        fail(f"random direction: rust Σ grad·v {dot:.8g} central difference {fd:.8g}")

    report(failures)


def report(failures):
    if failures:
        print(f"MISMATCH ({len(failures)}):")
        for f in failures[:20]:
            print("  " + f)
        sys.exit(1)
    print("OK: the Rust dVAE agrees with the NumPy reference")
    sys.exit(0)


if __name__ == "__main__":
    main()
