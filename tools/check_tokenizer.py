#!/usr/bin/env python3
"""Python compatibility check of a Tessera tokenizer.json (docs/tokenizer.md).

Loads TOKENIZER_JSON with Hugging Face's Python `tokenizers` (the version pinned in
tools/requirements.txt, the release of the Rust crate Tessera builds with) and checks that it
encodes every caption of CAPTIONS_FILE (UTF-8, one caption per line) to exactly the ids that
Tessera's Rust side produced, given in EXPECTED_IDS_JSON as a JSON list with one list of ids per
caption, in order. Encoding is as in Rust: no special tokens, no truncation, no padding.

    python3 tools/check_tokenizer.py TOKENIZER_JSON CAPTIONS_FILE EXPECTED_IDS_JSON

Exit 0 when every caption agrees; 1 naming the first mismatch (line, caption, both id lists) and
the number of mismatches; 2 on unreadable input.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    tok_path, captions_path, expected_path = argv[1:]
    try:
        from tokenizers import Tokenizer, __version__
    except ImportError as e:
        print(f"error: cannot import tokenizers ({e}); "
              "python3 -m pip install -r tools/requirements.txt", file=sys.stderr)
        return 2
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises plain Exception subclasses
        print(f"error: loading {tok_path}: {e}", file=sys.stderr)
        return 2
    tok.no_truncation()
    tok.no_padding()
    try:
        with open(captions_path, encoding="utf-8", newline="\n") as f:
            captions = f.read().split("\n")
        if captions and captions[-1] == "":
            captions.pop()
        with open(expected_path, encoding="utf-8") as f:
            expected = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not isinstance(expected, list) or len(expected) != len(captions):
        n = len(expected) if isinstance(expected, list) else "no list of"
        print(f"error: {expected_path} has {n} id lists for {len(captions)} captions "
              f"in {captions_path}", file=sys.stderr)
        return 2

    got = [e.ids for e in tok.encode_batch(captions, add_special_tokens=False)]
    bad = [i for i, (g, w) in enumerate(zip(got, expected)) if g != w]
    if bad:
        i = bad[0]
        print(f"MISMATCH at line {i + 1} of {captions_path}: {captions[i]!r}\n"
              f"  rust   {expected[i]}\n  python {got[i]}\n"
              f"{len(bad)} of {len(captions)} captions differ "
              f"(python tokenizers {__version__})", file=sys.stderr)
        return 1
    print(f"ok: {len(captions)} captions encode identically "
          f"(python tokenizers {__version__}, {tok.get_vocab_size()} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
