"""Write fixtures/tiny-parscale: a small random ParScale checkpoint with a byte-level tokenizer
(for tests that need arbitrary logits; the demo uses the trained fixtures/tiny-python-p4).

Deterministic: running it again rewrites byte-identical files (a test checks this).
Usage: python scripts/make_tiny_checkpoint.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from parscale_export.synthetic import parscale_config, write_checkpoint

EOS = "<|endoftext|>"
EOS_ID = 256  # ids 0..255 are the bytes themselves


def byte_alphabet() -> list[str]:
    """The GPT-2 byte-to-printable-character map, in byte order, so token id == byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(directory: Path) -> None:
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS, "model_max_length": 512}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(out: Path) -> None:
    config = parscale_config(parscale_n=4, parscale_n_tokens=8, vocab_size=264)
    generation = {"eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
    write_checkpoint(out, config, seed=2026, generation_config=generation)
    write_tokenizer(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "fixtures" / "tiny-parscale")
