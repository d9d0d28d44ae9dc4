"""Whether two answers to one job agree: the comparison rules of verification.

Pure: outputs in, a verdict out; no I/O, no peers. ``node.jobs.verify`` runs a
job a second time (a spot check, or ``verify: N``) and asks ``compare`` about
each pair of answers; ``node.jobs.reputation`` turns the verdicts into strikes.

Only deterministic jobs are compared (``uncheckable`` says why a job is not):

- ``embeddings``: every float tensor row by row, by cosine, and by norm; integer
  tensors (token counts) and texts must be equal.
- ``image-classification``: per image, the top-1 class must be equal and the
  top-k overlap at least half; a top-1 that each side still has in its top-k is
  a near tie (two classes a hair apart swap places under another precision):
  ``UNSURE``, never a disagreement. Scores are compared only where the classes
  match, and off scores are ``UNSURE`` (the labels are what a client acts on).
- ``text-generation``: only greedy jobs (``temperature`` 0; a remote API's
  default is not known, so there it must be asked for). Equal text agrees. With
  the same runner and precision, a text that leaves the other within its first
  quarter disagrees; a later split, or any split between different precisions,
  is ``UNSURE`` (greedy decoding follows a near tie either way).
- ``fake`` (the test runner): float tensors as embeddings, texts equal.

Tolerances go by the noisier side's precision ``grade`` (weights and inference
precision, as the peer's record announces them). Measured on all-MiniLM-L6-v2
(23 texts: the precision probe plus short, code, JSON, emoji, repeated words),
the lowest row cosine against fp32/f32 was: fp32 batched vs one at a time
0.9999999, fp32/f16 0.999999, fp16/f32 0.999999, fp32/bf16 0.99996, fp16/bf16
0.99994, int8/bf16 0.9988, int8/f32 0.9971 (on "OK"); norms stayed within
3.3e-4 (the model normalises). A wrong answer (another text's embedding) peaked
at 0.44. So the floors below leave each grade at least 7x its measured
1 - cos (int8: 0.02 against 0.0029; fp16/bf16: 0.002 against 0.00006) and sit
far above anything a wrong answer gives.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocols import Param, Request, Tensor, Value

EMBEDDINGS = "embeddings"
CLASSIFICATION = "image-classification"
GENERATION = "text-generation"
FAKE = "fake"
TASKS = frozenset({EMBEDDINGS, CLASSIFICATION, GENERATION, FAKE})


class Verdict(enum.StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"
    UNSURE = "unsure"  # a difference noise may explain: never counted against anyone


class Grade(enum.IntEnum):
    """How far a precision may move outputs, least first."""

    FULL = 0  # fp32 weights, f32 compute
    HALF = 1  # fp16 or bf16 somewhere
    INT8 = 2  # int8 weights
    OTHER = 3  # int4, a remote server's unknown precision, anything unnamed


# Per grade: the lowest row cosine that agrees, and how far a row's norm may stray.
COSINE_FLOOR = {Grade.FULL: 0.999, Grade.HALF: 0.998, Grade.INT8: 0.98, Grade.OTHER: 0.95}
NORM_TOLERANCE = {Grade.FULL: 0.01, Grade.HALF: 0.01, Grade.INT8: 0.02, Grade.OTHER: 0.1}
SCORE_TOLERANCE = {Grade.FULL: 0.01, Grade.HALF: 0.03, Grade.INT8: 0.05, Grade.OTHER: 0.1}
EARLY_SPLIT = 0.25  # greedy texts of one precision that part within this share disagree
# Runners whose generation defaults to greedy (runners.generation); others must ask.
GREEDY_BY_DEFAULT = frozenset({"openvino-genai", "torch", FAKE})


@dataclass(frozen=True, slots=True)
class Side:
    """What ran one answer, as its node announces the model."""

    runner: str = ""
    precision: str = ""  # the weights: fp32, fp16, int8, int4, unknown...
    inference_precision: str = ""  # what the device computes in: f32, bf16, f16, ""

    @classmethod
    def of(cls, entry: Mapping[str, Any] | None) -> Side:
        """From a record's model entry (``ModelInfo.describe()``); blanks for junk."""
        entry = entry or {}

        def text(key: str) -> str:
            value = entry.get(key)
            return value.casefold() if isinstance(value, str) else ""

        return cls(text("runner"), text("precision"), text("inference_precision"))

    @property
    def grade(self) -> Grade:
        weights = {"fp32": Grade.FULL, "fp16": Grade.HALF, "bf16": Grade.HALF}
        weights |= {"int8": Grade.INT8}
        compute = {"": Grade.FULL, "f32": Grade.FULL, "bf16": Grade.HALF, "f16": Grade.HALF}
        return max(
            weights.get(self.precision, Grade.OTHER),
            compute.get(self.inference_precision, Grade.OTHER),
        )


@dataclass(frozen=True, slots=True)
class Comparison:
    verdict: Verdict
    why: str
    cosine: float | None = None  # the lowest row cosine, when floats were compared

    @property
    def agrees(self) -> bool:
        return self.verdict is Verdict.AGREE


def uncheckable(task: str | None, request: Request, side: Side) -> str | None:
    """Why the job cannot be checked by running it again, or None when it can."""
    if request.stream:
        return "streamed (the routing node keeps no copy of the chunks)"
    if not request.idempotent:
        return "not idempotent: running it again is not harmless"
    if task not in TASKS:
        return f"task {task!r} is not known to be deterministic"
    if task == GENERATION and not greedy(request.params, side):
        return "sampled generation (temperature above 0, or a server's default)"
    return None


def greedy(params: Mapping[str, Param], side: Side) -> bool:
    temperature = params.get("temperature")
    if temperature is None:
        return side.runner in GREEDY_BY_DEFAULT
    return not isinstance(temperature, bool) and temperature == 0


def compare(
    task: str | None, a: Mapping[str, Value], b: Mapping[str, Value], sa: Side, sb: Side
) -> Comparison:
    """Whether answers ``a`` (from ``sa``) and ``b`` (from ``sb``) to one job agree.

    Symmetric. A primary output missing or malformed on one side only is a
    disagreement; on both sides, nothing is known (``UNSURE``).
    """
    grade = max(sa.grade, sb.grade)
    if task == CLASSIFICATION:
        return _classes(a, b, grade)
    if task == GENERATION:
        return _generated(a, b, sa, sb)
    primary = "embedding"
    if (primary in a) != (primary in b):
        return Comparison(Verdict.DISAGREE, f"{primary!r} on one side only")
    return _all(a, b, grade)


def fold(comparisons: Sequence[Comparison]) -> Comparison:
    """Several comparisons of one pair as one: any disagreement, then any doubt."""
    cosines = [c.cosine for c in comparisons if c.cosine is not None]
    low = min(cosines) if cosines else None
    for verdict in (Verdict.DISAGREE, Verdict.UNSURE):
        found = [c for c in comparisons if c.verdict is verdict]
        if found:
            return Comparison(verdict, "; ".join(c.why for c in found), low)
    return Comparison(Verdict.AGREE, "equal within tolerance", low)


# -- outputs of any task: every output present on both sides ---------------------------


def _all(a: Mapping[str, Value], b: Mapping[str, Value], grade: Grade) -> Comparison:
    found = [_value(name, a[name], b[name], grade) for name in sorted(set(a) & set(b))]
    return fold(found) if found else Comparison(Verdict.UNSURE, "no output on both sides")


def _value(name: str, x: Value, y: Value, grade: Grade) -> Comparison:
    if isinstance(x, Tensor) and isinstance(y, Tensor):
        return _tensors(name, x, y, grade)
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return Comparison(Verdict.DISAGREE, f"{name!r}: a tensor on one side only")
    if isinstance(x, float) or isinstance(y, float):  # a scalar figure: relative tolerance
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int | float):
            return Comparison(Verdict.DISAGREE, f"{name!r}: {x!r} vs {y!r}")
        if not isinstance(y, int | float):
            return Comparison(Verdict.DISAGREE, f"{name!r}: {x!r} vs {y!r}")
        close = math.isclose(x, y, rel_tol=1 - COSINE_FLOOR[grade], abs_tol=1e-6)
        return _equal(name, close, x, y)
    return _equal(name, x == y, x, y)


def _equal(name: str, same: bool, x: Any, y: Any) -> Comparison:
    if same:
        return Comparison(Verdict.AGREE, f"{name!r} equal")
    return Comparison(Verdict.DISAGREE, f"{name!r} differs: {_short(x)} vs {_short(y)}")


def _tensors(name: str, x: Tensor, y: Tensor, grade: Grade) -> Comparison:
    if x.shape != y.shape:
        return Comparison(Verdict.DISAGREE, f"{name!r}: shape {x.shape} vs {y.shape}")
    u, v = x.numpy(), y.numpy()
    if u.dtype.kind != "f" or v.dtype.kind != "f":
        return _equal(name, bool(np.array_equal(u, v)), "its values", "other values")
    return _floats(name, u, v, grade)


def _floats(
    name: str, u: np.ndarray[Any, Any], v: np.ndarray[Any, Any], grade: Grade
) -> Comparison:
    rows = u.shape[0] if u.ndim > 1 else 1  # a vector is one row
    rows_u = u.reshape(rows, -1).astype(np.float64)
    rows_v = v.reshape(rows, -1).astype(np.float64)
    finite_u, finite_v = np.isfinite(rows_u).all(), np.isfinite(rows_v).all()
    if not (finite_u and finite_v):
        verdict = Verdict.UNSURE if not (finite_u or finite_v) else Verdict.DISAGREE
        return Comparison(verdict, f"{name!r}: NaN or infinity")
    if rows_u.size == 0:
        return Comparison(Verdict.AGREE, f"{name!r} empty on both sides")
    nu, nv = np.linalg.norm(rows_u, axis=1), np.linalg.norm(rows_v, axis=1)
    if not np.array_equal(nu == 0, nv == 0):  # a zero row has no direction
        return Comparison(Verdict.DISAGREE, f"{name!r}: a zero row on one side only")
    keep = nu > 0
    if not keep.any():
        return Comparison(Verdict.AGREE, f"{name!r}: zero rows on both sides")
    cos = (rows_u[keep] * rows_v[keep]).sum(axis=1) / (nu[keep] * nv[keep])
    low = float(cos.min())
    floor = COSINE_FLOOR[grade]
    if low < floor:
        row = int(np.flatnonzero(keep)[int(cos.argmin())])
        why = f"{name!r} row {row}: cosine {low:.6f} below {floor} ({grade.name.lower()})"
        return Comparison(Verdict.DISAGREE, why, low)
    stray = float(np.abs(nu[keep] / nv[keep] - 1).max())
    if stray > NORM_TOLERANCE[grade]:
        why = f"{name!r}: a row's norm differs by {stray:.2%} (at most {NORM_TOLERANCE[grade]:.0%})"
        return Comparison(Verdict.DISAGREE, why, low)
    return Comparison(Verdict.AGREE, f"{name!r}: lowest cosine {low:.6f}", low)


# -- classification ---------------------------------------------------------------------


def _classes(a: Mapping[str, Value], b: Mapping[str, Value], grade: Grade) -> Comparison:
    x, y = a.get("indices"), b.get("indices")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            return Comparison(Verdict.DISAGREE, "'indices' on one side only")
        return Comparison(Verdict.UNSURE, "no 'indices' on either side")
    if x.shape != y.shape or len(x.shape) != 2 or x.numpy().dtype.kind not in "iu":
        return Comparison(Verdict.DISAGREE, f"'indices': shape {x.shape} vs {y.shape}")
    u, v = x.numpy(), y.numpy()
    k = u.shape[1]
    found: list[Comparison] = []
    for row, (p, q) in enumerate(zip(u.tolist(), v.tolist(), strict=True)):
        if not p:
            continue
        if p[0] != q[0]:
            if p[0] in q and q[0] in p:
                found.append(Comparison(Verdict.UNSURE, f"image {row}: near tie {p[0]}/{q[0]}"))
            else:
                why = f"image {row}: top-1 {p[0]} vs {q[0]}, not in the other's top-{k}"
                found.append(Comparison(Verdict.DISAGREE, why))
            continue
        overlap = len(set(p) & set(q))
        if 2 * overlap < k:
            why = f"image {row}: top-{k} share {overlap} classes"
            found.append(Comparison(Verdict.UNSURE, why))
        elif p == q:
            found.append(_scores(a, b, row, grade))
    verdict = fold(found) if found else Comparison(Verdict.AGREE, "no images")
    if verdict.agrees:
        return Comparison(Verdict.AGREE, f"top-1 equal on {u.shape[0]} image(s)")
    return verdict


def _scores(a: Mapping[str, Value], b: Mapping[str, Value], row: int, grade: Grade) -> Comparison:
    x, y = a.get("scores"), b.get("scores")
    if not (isinstance(x, Tensor) and isinstance(y, Tensor)) or x.shape != y.shape:
        return Comparison(Verdict.AGREE, "classes equal")
    gap = float(np.abs(x.numpy()[row].astype(np.float64) - y.numpy()[row]).max(initial=0.0))
    if not gap <= SCORE_TOLERANCE[grade]:  # NaN lands here too
        return Comparison(Verdict.UNSURE, f"image {row}: scores differ by {gap:.4f}")
    return Comparison(Verdict.AGREE, "classes and scores equal")


# -- generation -------------------------------------------------------------------------


def _generated(a: Mapping[str, Value], b: Mapping[str, Value], sa: Side, sb: Side) -> Comparison:
    x, y = a.get("text"), b.get("text")
    if not isinstance(x, str) or not isinstance(y, str):
        if isinstance(x, str) or isinstance(y, str):
            return Comparison(Verdict.DISAGREE, "'text' on one side only")
        return Comparison(Verdict.UNSURE, "no 'text' on either side")
    if x == y:
        return Comparison(Verdict.AGREE, f"texts equal ({len(x)} characters)")
    split = next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), None)
    shorter = min(len(x), len(y))
    if split is None:  # one ends where the other goes on: a stop or a length limit
        return Comparison(Verdict.UNSURE, f"one text stops at {shorter} characters")
    why = f"texts part at character {split} of {shorter}"
    if sa == sb and split < EARLY_SPLIT * shorter:
        return Comparison(Verdict.DISAGREE, why)
    return Comparison(Verdict.UNSURE, why)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
