#!/usr/bin/env python3
"""Two bounds on the image loss of Tessera's synthetic data (trainer/src/data/synthetic.rs) at the
sizes of the integration tests' small model (tests/lib.rs: grid 4, image_vocab 24, text_len 8,
min_caption_tokens 3), used by tests/tests/training.rs:

- caption-only bound: the least mean image cross-entropy of any predictor that sees the caption
  and the position but no earlier image token, i.e. the mean over cells of H(token | caption),
  computed exactly by enumerating the generator (objects, sizes, colours, shapes, caption length,
  square positions, 5% noise). A model must beat it to show image-to-image attention at work.
- noise floor: 5% of the cells are a uniform random token drawn independently of everything
  before them, so no causal predictor, however much it sees, goes below
  H(0.95·onehot + 0.05/Vi). A loss below it means the model saw the token it predicts.

    python3 tools/synthetic_bounds.py      # numpy only; about 30 s
"""
import numpy as np

G, VI, NOISE = 4, 24, 0.05
SIZES, COLOURS, SHAPES = 4, 8, 8
TEXT_LEN, MIN_CAPTION = 8, 3


def coverage(side):
    """[cells, 4]: P(the square covers the cell with texture k), over uniform positions."""
    c = np.zeros((G * G, 4))
    n = (G - side + 1) ** 2
    for r0 in range(G - side + 1):
        for c0 in range(G - side + 1):
            for r in range(r0, r0 + side):
                for cc in range(c0, c0 + side):
                    c[r * G + cc, (r - r0) % 2 * 2 + (cc - c0) % 2] += 1 / n
    return c


COV = [coverage(min(s + 1, G)) for s in range(SIZES)]
OBJECTS = [(s, c, h) for s in range(SIZES) for c in range(COLOURS) for h in range(SHAPES)]


def square(obj):
    """[cells, VI] token mass the object puts where it lies, and [cells] its coverage."""
    s, c, h = obj
    d = np.zeros((G * G, VI))
    for k in range(4):
        d[:, ((c * SHAPES + h) * 4 + k) % VI] += COV[s][:, k]
    return d, COV[s].sum(1)


SQUARE = {o: square(o) for o in OBJECTS}


def one(o1):
    d, cov = SQUARE[o1]
    bg = np.zeros((G * G, VI))
    bg[:, (COLOURS * SHAPES * 4 + o1[1]) % VI] = 1
    return d + (1 - cov)[:, None] * bg


def two(o1, o2):  # the second square is drawn over the first
    d, cov = SQUARE[o2]
    return d + (1 - cov)[:, None] * one(o1)


def entropy(p):
    p = (1 - NOISE) * p + NOISE / VI
    return -(p * np.log(p)).sum(1).mean()


def caption_only_bound():
    # Caption length is uniform in [3, 8]; one or two objects (1/2 each). Visible caption:
    # 3 words (1 object at any length, or 2 objects cut at 3), +relation (cut at 4), +size
    # (5), +colour (6), everything (7 or 8).
    lens = TEXT_LEN - MIN_CAPTION + 1
    p2 = 0.5 / lens  # P(two objects and a given cut length)
    total = 0.0
    for o1 in OBJECTS:
        b = one(o1)
        mix = np.mean([two(o1, o2) for o2 in OBJECTS], axis=0)
        cut3 = entropy((0.5 * b + p2 * mix) / (0.5 + p2)) * (0.5 + p2)
        cut4 = entropy(mix) * p2
        cut5 = np.mean([entropy(np.mean([two(o1, (s, c, h)) for c in range(COLOURS)
                                         for h in range(SHAPES)], axis=0))
                        for s in range(SIZES)]) * p2
        cut6 = np.mean([entropy(np.mean([two(o1, (s, c, h)) for h in range(SHAPES)], axis=0))
                        for s in range(SIZES) for c in range(COLOURS)]) * p2
        full = np.mean([entropy(two(o1, o2)) for o2 in OBJECTS]) * p2 * (lens - 4)
        total += (cut3 + cut4 + cut5 + cut6 + full) / len(OBJECTS)
    return total


def noise_floor():
    p, q = (1 - NOISE) + NOISE / VI, NOISE / VI
    return -(p * np.log(p) + (VI - 1) * q * np.log(q))


if __name__ == "__main__":
    print(f"caption-only bound {caption_only_bound():.4f} nats; noise floor {noise_floor():.4f} nats")
