#!/usr/bin/env python3
"""Independent NumPy reference of Tessera's stage-2 transformer (docs/model.md §1), used for the
cross-implementation check of docs/model.md §4.

It reads weights, a batch and the debug-state file that `trainer debug-state` wrote for them,
recomputes the losses and logits in float64 straight from the spec's text, checks every
`grad.<name>` against central finite differences of its own float64 loss, and exits 0 when
everything agrees, 1 otherwise (naming the first mismatches).

    trainer init-weights --config C --out W.safetensors
    trainer debug-state --config C --weights W.safetensors --batch B.safetensors --out O.safetensors
    python3 tools/reference_transformer.py --weights W.safetensors --batch B.safetensors \\
        --debug-state O.safetensors --heads H --conv-kernel K

Sizes other than heads and the conv kernel come from the weight shapes. Letters as in the spec:
B batch, Tt text length, Vt text vocabulary, G grid side, Vi image vocabulary, d width, h heads,
L layers, T = Tt + G² sequence length.

Checks and tolerances (|ref − rust| ≤ atol + rtol·|ref|):
  loss, loss_text, loss_image    atol 1e-5, rtol 1e-4
  logits [B, T, Vt+Tt+Vi]        atol 1e-4, rtol 1e-4
  grad.<name>: present for every parameter, with the parameter's shape;
  sampled entries                central difference of the float64 loss, eps 1e-4,
                                 atol 1e-5, rtol 2e-3 (the Rust side computes in f32);
                                 at least one entry of every tensor, rows of the token
                                 tables drawn from the ids the batch uses (--fd-samples N,
                                 default 40; N ≥ the parameter count checks every entry);
  one random direction per tensor  the same difference along a random ±1/√n direction
                                 against Σ grad·v, atol 1e-5, rtol 2e-3 of Σ |grad·v|;
  unused embedding rows          rows of text_emb / image_emb that no id in the batch selects
                                 have gradient exactly 0.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import numpy as np
from safetensors.numpy import load_file

LN_EPS = 1e-5
FD_EPS = 1e-4
TOL_LOSS = (1e-5, 1e-4)
TOL_LOGITS = (1e-4, 1e-4)
TOL_GRAD = (1e-5, 2e-3)
MAX_REPORTED = 8


class Model:
    """Sizes inferred from the weights, plus the two sizes the weights cannot tell."""

    def __init__(self, weights: dict[str, np.ndarray], heads: int, conv_kernel: int):
        def shape(name: str) -> tuple[int, ...]:
            if name not in weights:
                raise SystemExit(f"weights: no tensor `{name}`")
            return weights[name].shape

        self.text_len, self.d = shape("text_pos.weight")
        self.grid = shape("image_row.weight")[0]
        self.image_vocab = shape("image_emb.weight")[0]
        self.text_vocab = shape("text_emb.weight")[0] - self.text_len
        layer_ids = {int(m.group(1)) for k in weights if (m := re.match(r"blocks\.(\d+)\.", k))}
        self.layers = len(layer_ids)
        if layer_ids != set(range(self.layers)):
            raise SystemExit(f"weights: block indices {sorted(layer_ids)} are not 0..L-1")
        if heads < 1 or self.d % heads != 0:
            raise SystemExit(f"--heads {heads} does not divide d_model {self.d}")
        if conv_kernel < 1 or conv_kernel % 2 == 0:
            raise SystemExit(f"--conv-kernel {conv_kernel} must be odd and >= 1")
        if self.text_len < 2:
            raise SystemExit("text_len must be >= 2 (the text loss has Tt-1 positions)")
        self.heads = heads
        self.conv_kernel = conv_kernel
        self.seq_len = self.text_len + self.grid * self.grid
        self.text_rows = self.text_vocab + self.text_len
        self.vocab_total = self.text_rows + self.image_vocab
        self.masks = {kind: self._mask(kind) for kind in ("row", "column", "conv")}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter name of docs/model.md §1 with its shape."""
        d, G = self.d, self.grid
        shapes = {
            "text_emb.weight": (self.text_rows, d),
            "text_pos.weight": (self.text_len, d),
            "image_emb.weight": (self.image_vocab, d),
            "image_row.weight": (G, d),
            "image_col.weight": (G, d),
            "ln_f.weight": (d,),
            "ln_f.bias": (d,),
            "head.weight": (self.vocab_total, d),
        }
        for l in range(self.layers):
            p = f"blocks.{l}."
            shapes.update({
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.fc.weight": (4 * d, d),
                p + "mlp.fc.bias": (4 * d,),
                p + "mlp.proj.weight": (d, 4 * d),
                p + "mlp.proj.bias": (d,),
            })
        return shapes

    def layer_kind(self, l: int) -> str:
        """conv for the last layer, else column when l mod 4 = 1, else row (0-based l)."""
        if l == self.layers - 1:
            return "conv"
        if l % 4 == 1:
            return "column"
        return "row"

    def _mask(self, kind: str) -> np.ndarray:
        """allowed[p, q]: query p may attend key q, written out case by case as in the spec."""
        Tt, G, T = self.text_len, self.grid, self.seq_len
        K = (self.conv_kernel - 1) // 2
        allowed = np.zeros((T, T), dtype=bool)
        for p in range(T):
            for q in range(p + 1):  # q <= p always
                if p < Tt or q < Tt:
                    ok = True  # text query: any earlier key; image query: all text keys
                else:
                    i, j = p - Tt, q - Tt
                    ri, ci = divmod(i, G)
                    rj, cj = divmod(j, G)
                    if kind == "row":
                        ok = i - j <= G
                    elif kind == "column":
                        ok = cj == ci
                    else:
                        ok = abs(rj - ri) <= K and abs(cj - ci) <= K
                allowed[p, q] = ok
        return allowed


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased
    return (x - mean) / np.sqrt(var + LN_EPS) * w + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    y = x @ w.T
    return y if b is None else y + b


def gelu(u: np.ndarray) -> np.ndarray:
    return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def forward(m: Model, P: dict[str, np.ndarray], text: np.ndarray, image: np.ndarray):
    """Returns (logits [B, T, Vt+Tt+Vi], loss, loss_text, loss_image), all float64."""
    B, Tt, G, d, h = text.shape[0], m.text_len, m.grid, m.d, m.heads
    dh = d // h
    T = m.seq_len

    x = np.empty((B, T, d))
    x[:, :Tt] = P["text_emb.weight"][text] + P["text_pos.weight"][None]
    rows = np.arange(G * G) // G
    cols = np.arange(G * G) % G
    x[:, Tt:] = (
        P["image_emb.weight"][image]
        + P["image_row.weight"][rows][None]
        + P["image_col.weight"][cols][None]
    )

    for l in range(m.layers):
        p = f"blocks.{l}."
        a = layer_norm(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"])
        qkv = linear(a, P[p + "attn.qkv.weight"], P[p + "attn.qkv.bias"])
        # [B, T, d] -> [B, h, T, dh]: head j takes features j*dh..(j+1)*dh
        q, k, v = (qkv[..., n * d:(n + 1) * d].reshape(B, T, h, dh).transpose(0, 2, 1, 3)
                   for n in range(3))
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
        s = np.where(m.masks[m.layer_kind(l)][None, None], s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        attn = np.exp(s)
        attn /= attn.sum(axis=-1, keepdims=True)
        y = (attn @ v).transpose(0, 2, 1, 3).reshape(B, T, d)
        x = x + linear(y, P[p + "attn.proj.weight"], P[p + "attn.proj.bias"])
        a = layer_norm(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"])
        u = gelu(linear(a, P[p + "mlp.fc.weight"], P[p + "mlp.fc.bias"]))
        x = x + linear(u, P[p + "mlp.proj.weight"], P[p + "mlp.proj.bias"])

    z = linear(layer_norm(x, P["ln_f.weight"], P["ln_f.bias"]), P["head.weight"])

    # text: positions 0..Tt-2 predict text[p+1] over the text segment
    lt = log_softmax(z[:, : Tt - 1, : m.text_rows])
    ce_text = -np.take_along_axis(lt, text[:, 1:, None], axis=-1)[..., 0]
    # image: positions Tt-1..T-2 predict image[p-Tt+1] over the image segment
    li = log_softmax(z[:, Tt - 1 : T - 1, m.text_rows :])
    ce_image = -np.take_along_axis(li, image[:, :, None], axis=-1)[..., 0]
    loss_text = ce_text.mean()
    loss_image = ce_image.mean()
    loss = loss_text / 8.0 + 7.0 * loss_image / 8.0
    return z, loss, loss_text, loss_image


def read_ids(batch: dict[str, np.ndarray], name: str, cols: int, limit: int, path: str):
    if name not in batch:
        raise SystemExit(f"{path}: no tensor `{name}`")
    t = batch[name]
    if t.dtype not in (np.int64, np.int32):
        raise SystemExit(f"{path}: `{name}` has dtype {t.dtype}, expected int64 or int32")
    if t.ndim != 2 or t.shape[1] != cols:
        raise SystemExit(f"{path}: `{name}` has shape {list(t.shape)}, expected [B, {cols}]")
    bad = np.argwhere((t < 0) | (t >= limit))
    if len(bad):
        r, c = bad[0]
        raise SystemExit(f"{path}: `{name}`[{r}, {c}] = {t[r, c]} is outside [0, {limit})")
    return t.astype(np.int64)


def close(ref, got, tol) -> np.ndarray:
    atol, rtol = tol
    return np.abs(ref - got) <= atol + rtol * np.abs(ref)


class Report:
    def __init__(self):
        self.failures: list[str] = []

    def line(self, name: str, text: str, ok: bool):
        print(f"  {name:<22} {text}  {'ok' if ok else 'MISMATCH'}")

    def fail(self, message: str):
        self.failures.append(message)


def sample_entries(m: Model, P, text, image, n: int, rng) -> list[tuple[str, tuple[int, ...]]]:
    """max(n, #tensors) entries: one per tensor first, the rest spread over tensors in
    proportion to their size. Rows of the token tables come from the ids the batch uses.
    With n at least the number of parameters, every entry instead."""
    names = sorted(P)
    if n >= sum(P[name].size for name in names):
        return [(name, tuple(int(i) for i in idx))
                for name in names for idx in np.ndindex(P[name].shape)]
    used_rows = {"text_emb.weight": np.unique(text), "image_emb.weight": np.unique(image)}

    def draw(name: str) -> tuple[int, ...]:
        shape = P[name].shape
        if name in used_rows:
            return (int(rng.choice(used_rows[name])), int(rng.integers(shape[1])))
        return tuple(int(rng.integers(s)) for s in shape)

    picks = [(name, draw(name)) for name in names]
    sizes = np.array([P[name].size for name in names], dtype=float)
    for i in rng.choice(len(names), size=max(0, n - len(names)), p=sizes / sizes.sum()):
        picks.append((names[i], draw(names[i])))
    return picks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, help="weights (safetensors, docs/model.md §1 names)")
    ap.add_argument("--batch", required=True, help="batch: `text` [B,Tt], `image` [B,G²]")
    ap.add_argument("--debug-state", required=True, help="what `trainer debug-state` wrote")
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--conv-kernel", type=int, required=True)
    ap.add_argument("--fd-samples", type=int, default=40,
                    help="finite-difference entries (at least one per tensor; default 40; "
                         "at least the parameter count: every entry)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the entry sampling")
    args = ap.parse_args()

    P = {k: v.astype(np.float64) for k, v in load_file(args.weights).items()}
    m = Model(P, args.heads, args.conv_kernel)
    batch = load_file(args.batch)
    text = read_ids(batch, "text", m.text_len, m.text_rows, args.batch)
    image = read_ids(batch, "image", m.grid * m.grid, m.image_vocab, args.batch)
    if text.shape[0] != image.shape[0] or text.shape[0] == 0:
        raise SystemExit(f"{args.batch}: `text` has {text.shape[0]} rows, `image` "
                         f"{image.shape[0]}; they must agree and be >= 1")
    state = load_file(args.debug_state)
    rep = Report()

    kinds = " ".join(m.layer_kind(l) for l in range(m.layers))
    print(f"reference_transformer: Tt={m.text_len} Vt={m.text_vocab} G={m.grid} "
          f"Vi={m.image_vocab} d={m.d} h={m.heads} L={m.layers} kernel={m.conv_kernel} "
          f"B={text.shape[0]}; layers: {kinds}")

    expected = m.expected_shapes()
    missing = sorted(set(expected) - set(P))
    extra = sorted(set(P) - set(expected))
    wrong = [k for k in expected if k in P and P[k].shape != expected[k]]
    if missing or extra or wrong:
        for k in missing:
            rep.fail(f"weights: missing `{k}` {list(expected[k])}")
        for k in extra:
            rep.fail(f"weights: unexpected tensor `{k}`")
        for k in wrong:
            rep.fail(f"weights: `{k}` has shape {list(P[k].shape)}, expected {list(expected[k])}")
        return finish(rep)

    z, loss, loss_text, loss_image = forward(m, P, text, image)

    # Losses.
    for name, ref in (("loss", loss), ("loss_text", loss_text), ("loss_image", loss_image)):
        got = state.get(name)
        if got is None or got.shape != (1,):
            rep.fail(f"debug state: `{name}` missing or not of shape [1]")
            continue
        got = float(got[0])
        ok = bool(close(ref, got, TOL_LOSS))
        rep.line(name, f"ref {ref:.7f}  rust {got:.7f}  |Δ| {abs(ref - got):.2e}", ok)
        if not ok:
            rep.fail(f"`{name}`: reference {ref:.8g}, rust {got:.8g}")

    # Logits.
    got = state.get("logits")
    if got is None or got.shape != z.shape:
        rep.fail(f"debug state: `logits` has shape "
                 f"{None if got is None else list(got.shape)}, expected {list(z.shape)}")
    else:
        got = got.astype(np.float64)
        ok = close(z, got, TOL_LOGITS)
        rep.line("logits", f"max |Δ| {np.abs(z - got).max():.2e} over {z.size} entries",
                 bool(ok.all()))
        for idx in np.argwhere(~ok)[:MAX_REPORTED]:
            i = tuple(int(v) for v in idx)
            rep.fail(f"`logits`{list(i)}: reference {z[i]:.8g}, rust {got[i]:.8g}")

    # Gradient presence and shapes.
    grads = {}
    for name, shape in expected.items():
        g = state.get("grad." + name)
        if g is None:
            rep.fail(f"debug state: no `grad.{name}`")
        elif g.shape != shape:
            rep.fail(f"debug state: `grad.{name}` has shape {list(g.shape)}, "
                     f"expected {list(shape)}")
        else:
            grads[name] = g.astype(np.float64)
    rep.line("grad tensors", f"{len(grads)} of {len(expected)} present with the right shape",
             len(grads) == len(expected))

    def loss_at(name: str, delta: np.ndarray) -> float:
        saved = P[name]
        P[name] = saved + delta
        try:
            return forward(m, P, text, image)[1]
        finally:
            P[name] = saved

    rng = np.random.default_rng(args.seed)

    # Sampled entries against central differences.
    worst_abs, worst_ratio, count = 0.0, 0.0, 0
    for name, idx in sample_entries(m, P, text, image, args.fd_samples, rng):
        if name not in grads:
            continue
        delta = np.zeros_like(P[name])
        delta[idx] = FD_EPS
        fd = (loss_at(name, delta) - loss_at(name, -delta)) / (2 * FD_EPS)
        got = grads[name][idx]
        err = abs(fd - got)
        tol = TOL_GRAD[0] + TOL_GRAD[1] * abs(fd)
        worst_abs, worst_ratio, count = max(worst_abs, err), max(worst_ratio, err / tol), count + 1
        if err > tol:
            rep.fail(f"`grad.{name}`{list(idx)}: finite difference {fd:.8g}, rust {got:.8g}")
    rep.line("grad entries (fd)",
             f"{count} entries, max |Δ| {worst_abs:.2e}, max |Δ|/tol {worst_ratio:.2f}",
             worst_ratio <= 1.0)

    # One random direction per tensor: checks every entry in aggregate.
    worst_abs, worst_ratio = 0.0, 0.0
    for name in sorted(grads):
        v = rng.choice([-1.0, 1.0], size=P[name].shape) / math.sqrt(P[name].size)
        fd = (loss_at(name, FD_EPS * v) - loss_at(name, -FD_EPS * v)) / (2 * FD_EPS)
        got = float((grads[name] * v).sum())
        err = abs(fd - got)
        tol = TOL_GRAD[0] + TOL_GRAD[1] * float(np.abs(grads[name] * v).sum())
        worst_abs, worst_ratio = max(worst_abs, err), max(worst_ratio, err / tol)
        if err > tol:
            rep.fail(f"`grad.{name}` along a random direction: finite difference {fd:.8g}, "
                     f"rust Σ grad·v {got:.8g}")
    rep.line("grad directions (fd)",
             f"{len(grads)} tensors, max |Δ| {worst_abs:.2e}, max |Δ|/tol {worst_ratio:.2f}",
             worst_ratio <= 1.0)

    # Rows no id selects get no gradient.
    nonzero = 0
    for name, ids in (("text_emb.weight", text), ("image_emb.weight", image)):
        if name not in grads:
            continue
        unused = np.setdiff1d(np.arange(P[name].shape[0]), np.unique(ids))
        for r in unused:
            if np.any(grads[name][r] != 0):
                nonzero += 1
                rep.fail(f"`grad.{name}` row {r} is selected by no id in the batch but its "
                         f"gradient is non-zero (max |g| {np.abs(grads[name][r]).max():.3g})")
    rep.line("unused embedding rows", f"{nonzero} rows with a non-zero gradient", nonzero == 0)

    return finish(rep)


def finish(rep: Report) -> int:
    if rep.failures:
        print(f"FAIL: {len(rep.failures)} mismatches; the first:")
        for f in rep.failures[:MAX_REPORTED]:
            print(f"  {f}")
        return 1
    print("PASS: the debug state agrees with the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
