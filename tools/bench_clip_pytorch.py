#!/usr/bin/env python3
"""PyTorch peer of `data-prep embed`'s benchmark: Hugging Face `CLIPModel.get_image_features` on
the CPU, for the CLIP directory the Rust benchmark wrote (data-prep/tests/bench_embed.rs).

    python tools/bench_clip_pytorch.py --model DIR [--batch 32] [--batches 5] [--threads 2] [--bf16]

The images are the benchmark's pixel values, already preprocessed ([B, 3, S, S] float32 from
DIR/pixels.npy, the same values Tessera embeds), so only the vision tower, its head and the
normalisation are timed, as on the Rust side. One warm-up batch, then the median and minimum of
--batches batches. `--bf16` runs the forward pass under `torch.autocast("cpu", torch.bfloat16)`
(PyTorch's CPU mixed precision: linear layers in bf16). Prints one JSON line: images per second at the median, ms per batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import CLIPModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = CLIPModel.from_pretrained(a.model, attn_implementation="sdpa").eval()
    pixels = torch.from_numpy(np.load(f"{a.model}/pixels.npy"))[: a.batch]
    times = []
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    with torch.inference_mode(), autocast:
        for i in range(a.batches + 1):
            t0 = time.perf_counter()
            e = model.get_image_features(pixel_values=pixels)
            if not isinstance(e, torch.Tensor):  # transformers ≥ 5 returns the vision outputs
                e = e.pooler_output
            e = e.float()
            e = e / e.norm(dim=-1, keepdim=True)
            dt = time.perf_counter() - t0
            if i > 0:
                times.append(dt)
    med = statistics.median(times)
    print(
        json.dumps(
            {
                "impl": "pytorch",
                "torch": torch.__version__,
                "threads": a.threads,
                "precision": "bf16-autocast" if a.bf16 else "fp32",
                "batch": a.batch,
                "ms_per_batch_median": med * 1e3,
                "ms_per_batch_min": min(times) * 1e3,
                "images_per_s": a.batch / med,
                "first_embedding_head": e[0, :4].tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
