"""`make demo` ends by printing text a person can read: greedy output of the trained fixture."""

from __future__ import annotations

import re

from conftest import ROOT, TINY, TRAINED
from parscale_export.cli.main import main


def printable_fraction(text: str) -> float:
    """Share of characters that are printable or ordinary whitespace; U+FFFD (bytes that did
    not decode) counts as unprintable although Python calls it printable."""
    good = sum((c.isprintable() and c != "\ufffd") or c in "\n\t" for c in text)
    return good / max(1, len(text))


def demo_generate_args() -> tuple[str, str]:
    """The prompt and token count the Makefile's demo uses, so this test cannot drift from it."""
    makefile = (ROOT / "Makefile").read_text()
    found = re.search(r'generate \$\(DEMO\) --prompt "([^"]*)" --max-new-tokens (\d+)', makefile)
    assert found, "the demo's generate line changed; update this test"
    return found.group(1), found.group(2)


def demo_text(checkpoint, bundle, capsys) -> str:
    prompt, steps = demo_generate_args()
    assert main(["generate", str(bundle(checkpoint)), "--prompt", prompt, "--max-new-tokens", steps]) == 0
    return capsys.readouterr().out


def test_demo_makefile_uses_the_trained_fixture() -> None:
    assert "convert fixtures/tiny-python-p4 " in (ROOT / "Makefile").read_text()


def test_demo_continuation_is_readable_text(bundle, capsys) -> None:
    text = demo_text(TRAINED, bundle, capsys)
    assert len(text.strip()) >= 40, text
    assert printable_fraction(text) >= 0.95, text


def test_random_weights_would_fail_the_readability_check(bundle, capsys) -> None:
    """The measure can fail: the random byte-level fixture prints mostly noise."""
    assert printable_fraction(demo_text(TINY, bundle, capsys)) < 0.95
