"""Does a bundle produce what the PyTorch reference produces? A verdict that can fail.

Both engines are driven through stepping.Stepper with identical inputs:
  prefill   a left-padded batch (row b has 2*b padding tokens), all real positions
  decode    N steps fed with the reference's greedy tokens; greedy agreement of the bundle
  chunked   the same prompts in two chunks (sequence > 1 with past > 0)
  batch-1   the first prompt alone, prefill and decode
Every ONNX call is also checked against the I/O contract (names, shapes, dtypes), and the
profile of one short call says where the heavy nodes ran: a node that ONNX Runtime quietly put
on the CPU fails a CUDA validation. A quantized bundle is judged twice: as it runs, against the
float model under quantization's thresholds, and in "exact" phases that isolate the export from
the quantization (see _exact_phases).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .bundle import Manifest, read_manifest
from .config import load_config
from .contract import ORT_TYPES
from .environment import device_name, package_versions
from .errors import BundleError
from .placement import misplaced, summary
from .quantize import exact_kernels
from .reference import Reference
from .runtime import PROVIDER_NAMES, Runtime, cache_slots
from .stepping import State, Stepper


@dataclass(frozen=True)
class Thresholds:
    max_abs: float  # largest allowed |logit difference| at any compared position...
    scaled: bool  # ...times max(1, the reference's largest |logit|) when True (fp16: rounding grows with scale)
    min_cosine: float  # smallest allowed cosine similarity of a position's logit vectors
    min_top1: float  # smallest allowed fraction of positions whose argmax agrees
    greedy_must_match: bool  # the bundle's own greedy choices must equal the reference's


DEFAULT_THRESHOLDS = {
    # fp32 should agree to ~1e-5; 1e-3 leaves room for kernel differences, not for bugs.
    "float32": Thresholds(max_abs=1e-3, scaled=False, min_cosine=0.99999, min_top1=1.0, greedy_must_match=True),
    # fp16 rounds every weight and activation. The PyTorch model itself in fp16 against fp32 (the
    # same 5 checkpoints as bf16 below): max |error| <= 0.0038 x peak, cosine >= 0.999994, but
    # top-1 only >= 0.967 (one flip in 30 positions on flat random logits), so top-1 is a coarse
    # guard here and cosine the sharp one (the drifted checkpoints reach cosine <= 0.99877).
    "float16": Thresholds(max_abs=0.02, scaled=True, min_cosine=0.9999, min_top1=0.9, greedy_must_match=False),
    # bf16 keeps 8 mantissa bits. Measured with the PyTorch model itself in bfloat16 against
    # float32 (tiny fixture, the 3 conformance checkpoints, a mid-size P=4; prefill + 8 decode
    # steps): max |error| <= 0.024 x peak |logit|, cosine >= 0.99966, top-1 >= 0.93. The
    # drifted checkpoints of the tests reach cosine <= 0.99877 there: cosine separates them.
    "bfloat16": Thresholds(max_abs=0.05, scaled=True, min_cosine=0.9995, min_top1=0.9, greedy_must_match=False),
    # Weight-only quantization drifts by design. These bounds were measured on trained weights
    # (scripts/quant_drift.py on fixtures/tiny-python-p4, P=4, and a P=1 twin trained by the same
    # command; CPU provider, accuracy level 4), worst phase of either, then given a margin:
    #   int8  max |error| 0.0147 x largest |logit|, cosine 0.99975, top-1 0.95
    #   int4  max |error| 0.110 x largest |logit|,  cosine 0.9793,  top-1 0.833
    # int8's error bound keeps room for random weights too (a random tied head reaches 0.035);
    # the random-weight fixture's int4 bundle misses int4's (0.187, top-1 0.733): it should fail.
    "int8": Thresholds(max_abs=0.05, scaled=True, min_cosine=0.999, min_top1=0.9, greedy_must_match=False),
    "int4": Thresholds(max_abs=0.15, scaled=True, min_cosine=0.97, min_top1=0.75, greedy_must_match=False),
}


HOW = {
    "whole": "float32, every weight in memory",
    "layers": "float32, layer by layer: each layer's weights read from the checkpoint as it runs",
}

CPU_FALLBACK_WARNING = (
    "WARNING: CUDA is not usable here, so this validation runs on ONNX Runtime's CPU provider.\n"
    "         It says nothing about the CUDA provider you may deploy on; rerun on a GPU machine."
)


def default_thresholds(manifest: Manifest) -> Thresholds:
    """By quantization scheme when the bundle is quantized, else by dtype."""
    return DEFAULT_THRESHOLDS[manifest.quantization or manifest.dtype]


@dataclass(frozen=True)
class Settings:
    batch: int = 3
    prompt_length: int = 12
    decode_steps: int = 8
    seed: int = 0


@dataclass
class PhaseResult:
    name: str
    positions: int
    max_abs: float
    mean_abs: float
    reference_max_abs: float  # the reference's largest |logit|: a scaled threshold's unit
    min_cosine: float
    top1: float
    greedy_match: bool | None
    greedy_agreeing_steps: int | None  # decode steps before the bundle's first different greedy choice
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class Report:
    bundle: str
    checkpoint: str
    requested_provider: str
    provider: str  # the one that actually ran, read back from the session
    device: str
    dtype: str
    quantization: str | None
    thresholds: Thresholds
    settings: Settings
    phases: list[PhaseResult]
    contract_problems: list[str]
    placement: dict[str, dict[str, int]]  # heavy op type -> provider -> node runs, from one profiled call
    placement_problems: list[str]  # heavy ops that ran somewhere other than the provider asked for
    versions: dict[str, str | None]
    parscale_n: int | None = None
    exact_thresholds: Thresholds | None = None  # a quantized bundle's exact phases: its dtype's thresholds
    reference: str = "whole"  # how the PyTorch reference held its weights: "whole" or "layers" (reference.py)

    @property
    def passed(self) -> bool:
        return not self.contract_problems and not self.placement_problems and all(p.passed for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = "pass" if self.passed else "fail"
        for phase, result in zip(data["phases"], self.phases, strict=True):
            phase["passed"] = result.passed
        return data


class _Comparison:
    """Accumulates per-position logit comparisons for one phase."""

    def __init__(self) -> None:
        self.got: list[np.ndarray] = []
        self.want: list[np.ndarray] = []
        self.greedy_match: bool | None = None
        self.greedy_agreeing_steps: int | None = None

    def add(self, got: np.ndarray, want: np.ndarray, real: np.ndarray | None = None) -> None:
        """got/want [..., V]; `real` selects the positions that mean something (not padding)."""
        if real is not None:
            got, want = got[real], want[real]
        self.got.append(got.reshape(-1, got.shape[-1]).astype(np.float64))
        self.want.append(want.reshape(-1, want.shape[-1]).astype(np.float64))

    def result(self, name: str, limits: Thresholds) -> PhaseResult:
        got, want = np.concatenate(self.got), np.concatenate(self.want)
        diff = np.abs(got - want)
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cosine = (got * want).sum(axis=1) / np.maximum(norms, 1e-30)
        top1 = float((got.argmax(1) == want.argmax(1)).mean())
        res = PhaseResult(
            name=name,
            positions=len(got),
            max_abs=float(diff.max()),
            mean_abs=float(diff.mean()),
            reference_max_abs=float(np.abs(want).max()),
            min_cosine=float(cosine.min()),
            top1=top1,
            greedy_match=self.greedy_match,
            greedy_agreeing_steps=self.greedy_agreeing_steps,
        )
        if not np.isfinite(got).all():
            res.failures.append("non-finite logits")
        bound = limits.max_abs * max(1.0, res.reference_max_abs) if limits.scaled else limits.max_abs
        if res.max_abs > bound:
            res.failures.append(f"max |error| {res.max_abs:.3g} > {bound:.3g}")
        if res.min_cosine < limits.min_cosine:
            res.failures.append(f"cosine {res.min_cosine:.6f} < {limits.min_cosine}")
        if res.top1 < limits.min_top1:
            res.failures.append(f"top-1 agreement {res.top1:.3f} < {limits.min_top1}")
        if limits.greedy_must_match and self.greedy_match is False:
            res.failures.append("greedy tokens differ")
        return res


def make_prompts(vocab: int, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Random ids, left-padded: row b has min(2*b, length-1) padding tokens (id 0, mask 0)."""
    rng = np.random.default_rng(settings.seed)
    ids = rng.integers(0, vocab, size=(settings.batch, settings.prompt_length), dtype=np.int64)
    mask = np.ones_like(ids)
    for b in range(settings.batch):
        pad = min(2 * b, settings.prompt_length - 1)
        ids[b, :pad], mask[b, :pad] = 0, 0
    return ids, mask


class _Described:
    """Shape and dtype name of a device-resident OrtValue, without copying it to the host."""

    def __init__(self, value) -> None:
        self.shape = tuple(value.shape())
        self.dtype = ORT_TYPES.get(value.data_type(), value.data_type())


class _CheckedRuntime(Stepper):
    """Wraps the ONNX runtime so every call is checked against the contract."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.problems: list[str] = []

    def run(self, input_ids, attention_mask, past):
        logits, present = self.runtime.run(input_ids, attention_mask, past)
        contract = self.runtime.contract
        batch, seq = input_ids.shape
        described = [p if isinstance(p, np.ndarray) else _Described(p) for p in present]
        outputs = dict(zip(contract.output_names(), [logits, *described], strict=True))
        slots = cache_slots(past[0])
        for problem in contract.check_outputs(outputs, batch, seq, attention_mask.shape[1] - seq, slots):
            if problem not in self.problems:
                self.problems.append(problem)
        return logits, present

    @property
    def batched_chunks(self) -> bool:
        return self.runtime.batched_chunks

    def empty_past(self, batch, tokens=None):
        return self.runtime.empty_past(batch, tokens)


def _decode(
    bundle: Stepper, reference: Stepper, logits: tuple[np.ndarray, np.ndarray], states: tuple[State, State], steps: int
) -> _Comparison:
    """Feed the reference's greedy tokens to both; compare every step's last-position logits."""
    comparison = _Comparison()
    got, want = logits
    bundle_state, ref_state = states
    matches = []
    for _ in range(steps):
        token = want[:, -1].argmax(-1)
        matches.append(bool((got[:, -1].argmax(-1) == token).all()))
        got, bundle_state = bundle.extend(token[:, None], bundle_state)
        want, ref_state = reference.extend(token[:, None], ref_state)
        comparison.add(got[:, -1], want[:, -1])
    matches.append(bool((got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).all()))
    comparison.greedy_match = all(matches)
    comparison.greedy_agreeing_steps = matches.index(False) if False in matches else len(matches)
    return comparison


def compare(
    bundle: Stepper, reference: Stepper, vocab: int, settings: Settings, limits: Thresholds, log=lambda _: None
) -> list[PhaseResult]:
    """The four phases, each judged by `limits`: any Stepper against the reference."""
    ids, mask = make_prompts(vocab, settings)
    real = mask.astype(bool)
    phases = []

    log(f"prefill: batch {settings.batch}, {settings.prompt_length} tokens, left padding")
    got, bundle_state = bundle.prefill(ids, mask, reserve=settings.decode_steps)
    want, ref_state = reference.prefill(ids, mask)
    prefill = _Comparison()
    prefill.add(got, want, real)
    phases.append(prefill.result("prefill", limits))

    log(f"decode: {settings.decode_steps} greedy steps")
    decode = _decode(bundle, reference, (got, want), (bundle_state, ref_state), settings.decode_steps)
    phases.append(decode.result("decode", limits))

    rows = [slice(None)] if bundle.batched_chunks else [slice(b, b + 1) for b in range(settings.batch)]
    alone = "" if bundle.batched_chunks else ", one sequence at a time (GroupQueryAttention)"
    log(f"chunked prefill: the same prompts in two calls (past > 0, sequence > 1){alone}")
    split = settings.prompt_length // 2
    parts = []
    for row in rows:
        first, state = bundle.prefill(ids[row, :split], mask[row, :split], reserve=settings.prompt_length - split)
        second, _ = bundle.run(ids[row, split:], mask[row], state.past)  # the full mask: the chunk may hold padding
        parts.append(np.concatenate([first, second], axis=1))
    chunked = _Comparison()
    chunked.add(np.concatenate(parts, axis=0), want, real)
    phases.append(chunked.result("chunked-prefill", limits))

    log("batch 1: the first prompt alone")
    one_ids, one_mask = ids[:1, real[0]], mask[:1, real[0]]
    got1, b_state = bundle.prefill(one_ids, one_mask, reserve=settings.decode_steps)
    want1, r_state = reference.prefill(one_ids, one_mask)
    single = _decode(bundle, reference, (got1, want1), (b_state, r_state), settings.decode_steps)
    single.add(got1, want1)
    phases.append(single.result("batch-1", limits))
    return phases


def run_validation(
    bundle_dir: Path,
    checkpoint_dir: Path | None = None,
    provider: str = "auto",
    settings: Settings = Settings(),
    thresholds: Thresholds | None = None,
    log=lambda _: None,
    parallel: int | None = None,
    reference_way: str = "auto",
) -> Report:
    """Validate one bundle, or the member P = `parallel` of a family bundle (default: its largest).
    `reference_way`: how the PyTorch reference holds its weights (reference.WAYS; "auto": layer by
    layer when the float32 model would crowd memory)."""
    manifest = read_manifest(bundle_dir, parallel)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else manifest.source_checkpoint
    if checkpoint_dir is None:
        raise BundleError(f"{bundle_dir}: manifest records no source checkpoint; pass --checkpoint")
    _check_same_shape(manifest.raw.get("model", {}), load_config(checkpoint_dir), checkpoint_dir)
    limits = thresholds or default_thresholds(manifest)

    # The P just read: a family's member (default, the largest), or a single bundle's own P.
    runtime = Runtime(bundle_dir, provider=provider, parallel=manifest.contract.parscale_n, profile=True)
    log(f"ONNX Runtime provider: {runtime.provider.upper()}")
    if runtime.provider == "cpu" and provider == "auto":
        log(CPU_FALLBACK_WARNING)
    # Placement is fixed per session: one 2-token call (no room reserved beyond it) shows it all.
    runtime.prefill(np.ones((1, 2), np.int64), np.ones((1, 2), np.int64), reserve=0)
    placement = runtime.placement()
    bundle = _CheckedRuntime(runtime)
    reference = Reference.from_checkpoint(checkpoint_dir, way=reference_way)
    log(f"PyTorch reference from {checkpoint_dir}: {HOW[reference.how]}")
    phases = compare(bundle, reference, manifest.contract.vocab_size, settings, limits, log)
    problems, used, how = list(bundle.problems), runtime.provider, reference.how
    del reference, bundle, runtime  # the exact phases load a second session and model: not beside these
    exact_limits = None
    if manifest.quantization:
        exact_limits = DEFAULT_THRESHOLDS[manifest.dtype]
        exact, exact_problems = _exact_phases(
            manifest, bundle_dir, checkpoint_dir, used, settings, exact_limits, log, how
        )
        phases += exact
        problems += exact_problems

    return Report(
        bundle=str(Path(bundle_dir).resolve()),
        checkpoint=str(Path(checkpoint_dir).resolve()),
        requested_provider=provider,
        provider=used,
        device=device_name(used),
        dtype=manifest.dtype,
        quantization=manifest.quantization,
        thresholds=limits,
        settings=settings,
        phases=phases,
        contract_problems=problems,
        placement=summary(placement),
        placement_problems=misplaced(placement, PROVIDER_NAMES[used]),
        versions=package_versions("onnxruntime-gpu", "onnxruntime", "torch", "onnx"),
        parscale_n=manifest.contract.parscale_n,
        exact_thresholds=exact_limits,
        reference=how,
    )


def _exact_phases(
    manifest: Manifest,
    bundle_dir: Path,
    checkpoint_dir: Path,
    provider: str,
    settings: Settings,
    limits: Thresholds,
    log,
    reference_way: str,
) -> tuple[list[PhaseResult], list[str]]:
    """A quantized bundle's own phases compare it with the float model under thresholds wide
    enough for quantization, which also let a wrong prefix or bias through (a prefix scaled by
    1.5 moves the trained fixture's logits by 0.014; int8's activation rounding alone by 0.09).
    Here the same graph computes with float activations (MatMulNBits accuracy level 0) against a
    reference holding the bundle's dequantized weights: only arithmetic order differs, so the
    dtype's own thresholds apply and any other difference fails."""
    log("exact phases: the graph with float activations against the reference with its quantized weights")
    graph = exact_kernels(onnx.load(str(manifest.model_path), load_external_data=False)).SerializeToString()
    runtime = Runtime(bundle_dir, provider=provider, parallel=manifest.contract.parscale_n, graph=graph)
    exact = _CheckedRuntime(runtime)
    dtype = manifest.contract.np_dtype
    reference = Reference.from_checkpoint(checkpoint_dir, manifest.quantization, dtype, reference_way)
    phases = compare(exact, reference, manifest.contract.vocab_size, settings, limits, log)
    return [replace(phase, name=f"exact {phase.name}") for phase in phases], exact.problems


def _check_same_shape(model: dict, config, checkpoint_dir: Path) -> None:
    """A bundle can only be validated against a checkpoint of the same shape."""
    ours = {
        "parscale_n": config.parscale_n,
        "parscale_n_tokens": config.parscale_n_tokens,
        "num_layers": config.num_layers,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
    }
    for key, value in ours.items():
        if model.get(key) != value:
            raise BundleError(f"bundle and checkpoint {checkpoint_dir} disagree on {key}: {model.get(key)} vs {value}")
