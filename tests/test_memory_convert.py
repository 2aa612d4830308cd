"""convert's memory does not grow with the model: two synthetic checkpoints, one four times the
other, convert with peaks that differ by far less than their weights do.

Each convert runs in its own process, measured by the kernel's high-water mark of its resident
memory (peakmemory's peak_rss_bytes: exact, where sampling would catch more of the write's
short peaks in the longer run; it also counts mapped shared libraries, the same in both runs,
and convert maps no weights). A convert that held its weights (as one did until the writer
streamed them) peaks at least the float32 weights higher for the larger checkpoint: 790 MB more
here (250 MB against 1 GB), where streaming ones peaked at 500-550 MiB either way, varying by
50 MiB from run to run. Two layers keep the tracing, the same for both, short.
"""

from __future__ import annotations

import sys

import pytest

from parscale_export.bundle import DATA_FILE
from parscale_export.peakmemory import run_measured
from parscale_export.synthetic import parscale_config, write_checkpoint

SMALL = dict(hidden_size=512, intermediate_size=1536, vocab_size=114688, num_attention_heads=8, num_key_value_heads=2,
             parscale_n=2, parscale_n_tokens=4, tie_word_embeddings=True, torch_dtype="bfloat16")  # fmt: skip
# Every matrix and the embedding 4x: twice the width, twice the intermediate size, twice the vocabulary.
LARGE = SMALL | dict(hidden_size=1024, intermediate_size=3072, vocab_size=229376)
CONVERT = [sys.executable, "-c", "from parscale_export.cli.main import run; run()", "convert"]


@pytest.fixture(scope="module")
def peaks(tmp_path_factory) -> dict[str, tuple[int, int]]:
    """(peak resident bytes, data file bytes) of an fp32 convert of each checkpoint."""
    root = tmp_path_factory.mktemp("memory")
    out = {}
    for name, shape in (("small", SMALL), ("large", LARGE)):
        checkpoint = write_checkpoint(root / name, parscale_config(**shape), seed=1)
        bundle = root / f"{name}-bundle"
        measured = run_measured([*CONVERT, str(checkpoint), "-o", str(bundle)], timeout=600)
        assert measured.returncode == 0
        out[name] = measured.peak_rss_bytes, (bundle / DATA_FILE).stat().st_size
        (bundle / DATA_FILE).unlink()
    return out


def test_convert_memory_does_not_grow_with_the_weights(peaks) -> None:
    (small_peak, small_data), (large_peak, large_data) = peaks["small"], peaks["large"]
    assert large_data > 3.5 * small_data  # the premise: four times the weights (790 MB more in float32)
    grown = large_peak - small_peak
    assert grown < (large_data - small_data) / 4, f"peak grew {grown / 2**20:.0f} MiB with the weights"
