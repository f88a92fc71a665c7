#!/usr/bin/env python3
"""Re-save OpenAI's released DALL·E dVAE (encoder.pkl + decoder.pkl) as one safetensors file that
Tessera loads unchanged (docs/model.md §2; docs/dvae-weights.md).

Download the two pickles (OpenAI's CDN; the URLs that `dall_e`'s README loads):

    curl -LO https://cdn.openai.com/dall-e/encoder.pkl
    curl -LO https://cdn.openai.com/dall-e/decoder.pkl

Install torch (any 1.x/2.x CPU build). The `dall_e` package is optional: without it, the pickled
`dall_e` modules are read into plain stand-in objects, which is all the conversion needs.

    python3 -m pip install torch            # and optionally: python3 -m pip install --no-deps dall-e

Convert:

    python3 tools/convert_openai_dvae.py --encoder encoder.pkl --decoder decoder.pkl \\
        --out openai-dvae.safetensors

What it writes: one safetensors file (byte-identical for the same pickles: tensors in name order,
the header's keys sorted), every tensor float32 and contiguous, named `encoder.<key>`
and `decoder.<key>` for every key of the two modules' state dicts (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.w`, …, `blocks.output.conv.b`); metadata
{"format": "pt", "source": "openai dall_e encoder.pkl + decoder.pkl", and the sizes}. OpenAI's
release has n_hid 256, n_blk_per_group 2, vocab_size 8192, decoder n_init 128: 150 tensors, 97.6 M
parameters (encoder 53.8 M, decoder 43.8 M), a 390 MB file. Before writing, the names and shapes are checked against docs/model.md §2's layout for
the sizes read from the tensors, and the script exits 1 naming any difference. Then:

    trainer reconstruct --weights openai-dvae.safetensors --images shards/images-00000.tis
    data-prep encode --dvae openai-dvae.safetensors --images 'shards/*.tis' ...

Unpickling runs code from the file: convert only pickles from the URLs above.

`--selftest [--out DIR]` needs no download: it builds small randomly initialised `dall_e`
Encoder/Decoder modules (the real classes if `dall_e` is installed, else state dicts of the same
names and shapes), pickles them as OpenAI did (`torch.save` of the whole module), converts them
through the same path (with the real classes and with the stand-ins), and checks the result. With
`dall_e` installed it also writes DIR/check.safetensors: images, the encoder's logits, the argmax
codes, the decoder's output on their one-hot, and the reconstruction, all computed by `dall_e`
itself, which `trainer/tests/dvae_openai.rs` compares against Tessera.
"""

import argparse
import pickle
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path

GROUP_COUNT = 4
LOGIT_LAPLACE_EPS = 0.1


class _Stub:
    """Stand-in for a pickled `dall_e` class when `dall_e` is not importable: keeps the object's
    state (for an nn.Module, its `_modules` and `_parameters`)."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state


def _pickle_module(force_stub):
    """A `pickle`-like module for torch.load whose Unpickler maps `dall_e` classes to _Stub when
    they cannot be imported (always, with `force_stub`)."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "dall_e" or module.startswith("dall_e."):
                if force_stub:
                    return _Stub
                try:
                    return super().find_class(module, name)
                except (ImportError, AttributeError):
                    return _Stub
            return super().find_class(module, name)

    m = types.ModuleType("dvae_pickle")
    m.__dict__.update(pickle.__dict__)
    m.Unpickler = Unpickler
    m.load = lambda f, **kw: Unpickler(f, **kw).load()
    return m


def load_pickled_module(path, force_stub=False):
    """The object pickled in `path` (OpenAI's encoder.pkl / decoder.pkl: a whole module)."""
    import torch

    kw = dict(map_location="cpu", pickle_module=_pickle_module(force_stub))
    try:
        return torch.load(path, weights_only=False, **kw)
    except TypeError:  # torch < 1.13 has no weights_only
        return torch.load(path, **kw)


def named_tensors(module, prefix=""):
    """The state dict of a module, real or stand-in: `_parameters` and persistent `_buffers`,
    recursively through `_modules`, named as `state_dict()` names them."""
    d = module.__dict__
    out = OrderedDict()
    for kind in ("_parameters", "_buffers"):
        for name, t in (d.get(kind) or {}).items():
            if t is None or name in (d.get("_non_persistent_buffers_set") or set()):
                continue
            out[prefix + name] = t.detach()
    for name, child in (d.get("_modules") or {}).items():
        if child is not None:
            out.update(named_tensors(child, f"{prefix}{name}."))
    return out


def expected_layout(n_hid, n_blk, k, n_init):
    """docs/model.md §2's names and shapes for these sizes (dall_e's Encoder and Decoder)."""
    out = OrderedDict()

    def conv(name, c_in, c_out, kw):
        out[name + ".w"] = (c_out, c_in, kw, kw)
        out[name + ".b"] = (c_out,)

    def block(name, n_in, n_out, kernels):
        hid = n_out // 4
        if n_in != n_out:
            conv(name + ".id_path", n_in, n_out, 1)
        chans = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
        for i, ((a, b), kw) in enumerate(zip(chans, kernels)):
            conv(f"{name}.res_path.conv_{i + 1}", a, b, kw)

    conv("encoder.blocks.input", 3, n_hid, 7)
    c = n_hid
    for g in range(1, GROUP_COUNT + 1):
        width = n_hid << (g - 1)
        for i in range(1, n_blk + 1):
            block(f"encoder.blocks.group_{g}.block_{i}", c, width, (3, 3, 3, 1))
            c = width
    conv("encoder.blocks.output.conv", c, k, 1)
    conv("decoder.blocks.input", k, n_init, 1)
    c = n_init
    for g in range(1, GROUP_COUNT + 1):
        width = n_hid << (GROUP_COUNT - g)
        for i in range(1, n_blk + 1):
            block(f"decoder.blocks.group_{g}.block_{i}", c, width, (1, 3, 3, 3))
            c = width
    conv("decoder.blocks.output.conv", c, 6, 1)
    return out


def infer_sizes(tensors):
    n_hid = tensors["encoder.blocks.input.w"].shape[0]
    k = tensors["encoder.blocks.output.conv.w"].shape[0]
    n_init = tensors["decoder.blocks.input.w"].shape[0]
    n_blk = 0
    while f"encoder.blocks.group_1.block_{n_blk + 1}.res_path.conv_1.w" in tensors:
        n_blk += 1
    return n_hid, n_blk, k, n_init


def convert(encoder, decoder, force_stub=False):
    """name → float32 tensor, docs/model.md names, from the two pickles; checked against the layout."""
    tensors = OrderedDict()
    for prefix, path in (("encoder.", encoder), ("decoder.", decoder)):
        module = load_pickled_module(path, force_stub)
        for name, t in named_tensors(module).items():
            tensors[prefix + name] = t.float().contiguous()
    expected = expected_layout(*infer_sizes(tensors))
    problems = [f"missing {n} {list(s)}" for n, s in expected.items() if n not in tensors]
    problems += [f"unexpected {n}" for n in tensors if n not in expected]
    problems += [
        f"{n}: shape {list(tensors[n].shape)}, expected {list(s)}"
        for n, s in expected.items()
        if n in tensors and tuple(tensors[n].shape) != s
    ]
    if problems:
        raise SystemExit("the pickles do not hold docs/model.md §2's layout:\n  " + "\n  ".join(problems))
    return tensors


def write_safetensors(arrays, out, metadata):
    """Writes `arrays` (name -> float32 numpy array) as a safetensors file whose bytes depend on
    nothing but the input: tensors in name order, the header's JSON with sorted keys and no
    spaces (padded with spaces to a multiple of 8 bytes), no timestamps. (`safetensors.torch.
    save_file` keeps the metadata in a hash map, whose order changes from run to run.) Written to
    `<out>.tmp` and renamed."""
    import json
    import os

    import numpy as np

    header = {"__metadata__": dict(metadata)}
    blobs = []
    offset = 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        blob = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = Path(str(out) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)


def save(tensors, out):
    n_hid, n_blk, k, n_init = infer_sizes(tensors)
    meta = {
        "format": "pt",
        "source": "openai dall_e encoder.pkl + decoder.pkl",
        "n_hid": str(n_hid),
        "n_blk_per_group": str(n_blk),
        "vocab_size": str(k),
        "n_init": str(n_init),
    }
    write_safetensors({n: t.numpy() for n, t in tensors.items()}, out, meta)


def selftest(out_dir):
    import torch

    torch.manual_seed(0)
    n_hid, n_blk, k, n_init, res, batch = 16, 1, 64, 24, 32, 2
    try:
        import dall_e
    except ImportError:
        dall_e = None
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="dvae-selftest-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if dall_e is not None:
        enc = dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=k, device=torch.device("cpu"))
        dec = dall_e.Decoder(
            n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=k, device=torch.device("cpu")
        )
        for m in (enc, dec):  # dall_e starts biases at 0; random ones test more
            for name, p in m.named_parameters():
                if name.endswith(".b"):
                    p.data.uniform_(-0.1, 0.1)
        for m, name in ((enc, "encoder.pkl"), (dec, "decoder.pkl")):
            torch.save(m, out_dir / name)
        source = "dall_e modules"
    else:
        # No dall_e: pickle plain dicts of the state-dict names (the stand-in path is then not
        # exercised, only the naming, layout check and writing).
        layout = expected_layout(n_hid, n_blk, k, n_init)
        for part in ("encoder", "decoder"):
            sd = OrderedDict(
                (n[len(part) + 1 :], torch.randn(s) * 0.1) for n, s in layout.items() if n.startswith(part + ".")
            )
            module = torch.nn.Module()
            for name, t in sd.items():
                *path, leaf = name.split(".")
                m = module
                for p in path:
                    if p not in m._modules:
                        m._modules[p] = torch.nn.Module()
                    m = m._modules[p]
                m._parameters[leaf] = torch.nn.Parameter(t)
            torch.save(module, out_dir / f"{part}.pkl")
        source = "state dicts of dall_e's names (dall_e not installed)"

    tensors = convert(out_dir / "encoder.pkl", out_dir / "decoder.pkl")
    stubbed = convert(out_dir / "encoder.pkl", out_dir / "decoder.pkl", force_stub=True)
    assert list(tensors) == list(stubbed)
    assert all(torch.equal(tensors[n], stubbed[n]) for n in tensors)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert infer_sizes(tensors) == (n_hid, n_blk, k, n_init)
    save(tensors, out_dir / "dvae.safetensors")
    first = (out_dir / "dvae.safetensors").read_bytes()
    save(tensors, out_dir / "dvae.safetensors")
    assert (out_dir / "dvae.safetensors").read_bytes() == first, "the same input wrote different bytes"

    from safetensors.torch import load_file

    back = load_file(str(out_dir / "dvae.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[n], tensors[n]) for n in tensors)

    if dall_e is not None:
        # The outputs of dall_e itself, for trainer/tests/dvae_openai.rs.
        from safetensors.torch import save_file

        with torch.no_grad():
            images = torch.rand(batch, 3, res, res)
            logits = enc(dall_e.map_pixels(images))
            codes = torch.argmax(logits, dim=1)
            one_hot = torch.nn.functional.one_hot(codes, num_classes=k).permute(0, 3, 1, 2).float()
            stats = dec(one_hot).float()
            recon = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))
        save_file(
            {
                "images": images.contiguous(),
                "logits": logits.contiguous(),
                "codes": codes.to(torch.int64).contiguous(),
                "stats": stats.contiguous(),
                "recon": recon.contiguous(),
            },
            str(out_dir / "check.safetensors"),
            metadata={"resolution": str(res)},
        )
    print(f"selftest ok: {len(tensors)} tensors from {source}; wrote {out_dir}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", type=Path, help="encoder.pkl")
    ap.add_argument("--decoder", type=Path, help="decoder.pkl")
    ap.add_argument("--out", type=Path, help="the safetensors file to write (with --selftest: a folder)")
    ap.add_argument("--selftest", action="store_true", help="convert small random dall_e modules; no download")
    a = ap.parse_args()
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("this script needs torch: python3 -m pip install torch")
    if a.selftest:
        selftest(a.out)
        return
    if not (a.encoder and a.decoder and a.out):
        ap.error("--encoder, --decoder and --out are required (or --selftest)")
    tensors = convert(a.encoder, a.decoder)
    save(tensors, a.out)
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {a.out}: {len(tensors)} tensors, {n / 1e6:.1f} M parameters, sizes {infer_sizes(tensors)}")


if __name__ == "__main__":
    main()
