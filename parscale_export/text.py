"""The bundle's tokenizer (tokenizer.json, via the `tokenizers` library) and streaming decode."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import BundleError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(bundle_dir: Path) -> Tokenizer | None:
    """The bundle's tokenizer, or None when the checkpoint shipped none."""
    path = Path(bundle_dir) / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception for a bad file
        raise BundleError(f"{path}: cannot load the tokenizer ({exc})") from None


class TextStream:
    """Turns a growing list of token ids into text pieces, holding back incomplete characters
    (byte-level tokens can split a UTF-8 character across several ids)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece
