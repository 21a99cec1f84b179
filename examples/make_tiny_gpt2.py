"""Build a small GPT-2 from a config (nothing downloaded), save it with ``save_pretrained``, and write
byte-level token ids of a real text (CPython's ``this`` module, PEP 20) to an .npz.

    python examples/make_tiny_gpt2.py runs/gpt2-tiny runs/zen-tokens.npz
"""

import codecs
import contextlib
import io
import sys

import numpy as np
import torch
import transformers


def zen_bytes() -> bytes:
    with contextlib.redirect_stdout(io.StringIO()):   # importing `this` prints PEP 20
        import this
    return codecs.decode(this.s, "rot13").encode()


def main(folder: str, tokens: str, seq: int = 32) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=seq, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    ids = np.frombuffer(zen_bytes(), dtype=np.uint8).astype(np.int64)
    n = len(ids) // seq
    X = ids[: n * seq].reshape(n, seq)
    np.savez(tokens, X=X[: n - 4], y=X[: n - 4], X_test=X[n - 4:], y_test=X[n - 4:])
    print(f"{folder}: GPT-2 with {sum(p.numel() for p in transformers.GPT2LMHeadModel(cfg).parameters()):,} "
          f"parameters; {tokens}: {n - 4} train / 4 test sequences of {seq} byte tokens")


if __name__ == "__main__":
    main(*sys.argv[1:3])
