"""The comparison rules of verification (node.jobs.compare) and the strike rule
(node.jobs.judge): pure, on hand-made answers."""

from __future__ import annotations

import numpy as np
import pytest

from node.jobs.compare import (
    COSINE_FLOOR,
    Grade,
    Side,
    Verdict,
    compare,
    uncheckable,
)
from node.jobs.judge import Answer, judge
from node.jobs.reputation import Outcome
from protocols import Request, Tensor

FP32 = Side("openvino", "fp32", "f32")
BF16 = Side("openvino", "fp32", "bf16")
FP16 = Side("openvino", "fp16", "f32")
INT8 = Side("openvino", "int8", "bf16")
REMOTE = Side("openai", "unknown", "")
FAKE = Side("fake", "fp32", "")


def unit_rows(seed: int, n: int = 4, dim: int = 384) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def tilted(rows: np.ndarray, cosine: float, seed: int = 1) -> np.ndarray:
    """Rows at exactly ``cosine`` to ``rows``, the same norm."""
    other = np.random.default_rng(seed).normal(size=rows.shape)
    other -= (other * rows).sum(axis=1, keepdims=True) * rows  # orthogonal to each row
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    sin = np.sqrt(1 - cosine**2)
    return cosine * rows + sin * other


def emb(rows: np.ndarray, **more: object) -> dict[str, object]:
    return {"embedding": Tensor.from_numpy(rows.astype(np.float32)), **more}


def test_grades_follow_weights_and_compute() -> None:
    assert FP32.grade is Grade.FULL and FAKE.grade is Grade.FULL
    assert BF16.grade is Grade.HALF and FP16.grade is Grade.HALF
    assert INT8.grade is Grade.INT8
    assert REMOTE.grade is Grade.OTHER and Side().grade is Grade.OTHER
    assert (
        Side.of({"runner": "openvino", "precision": "FP32", "inference_precision": "f32"}) == FP32
    )
    assert Side.of({"precision": 3}) == Side()


@pytest.mark.parametrize(
    ("sides", "noise"),
    [
        # The measured floors of each pair (node.jobs.compare's docstring), as noise.
        ((FP32, FP32), 0.9999999),
        ((FP32, BF16), 0.99996),
        ((FP16, BF16), 0.99994),
        ((FP32, INT8), 0.9971),
        ((INT8, INT8), 0.995),  # two int8 nodes can drift apart twice as far
        ((REMOTE, FP32), 0.97),
    ],
)
def test_measured_noise_agrees(sides: tuple[Side, Side], noise: float) -> None:
    rows = unit_rows(0)
    got = compare("embeddings", emb(rows), emb(tilted(rows, noise)), *sides)
    assert got.verdict is Verdict.AGREE, got
    assert got.cosine == pytest.approx(noise, abs=1e-6)


@pytest.mark.parametrize("sides", [(FP32, FP32), (FP32, BF16), (INT8, INT8), (REMOTE, INT8)])
def test_a_wrong_answer_disagrees_at_every_grade(sides: tuple[Side, Side]) -> None:
    rows = unit_rows(0)
    wrong = unit_rows(7)  # another text's embedding: cosine about 0
    got = compare("embeddings", emb(rows), emb(wrong), *sides)
    assert got.verdict is Verdict.DISAGREE and "cosine" in got.why
    # Just under the noisier side's floor is a disagreement too.
    floor = COSINE_FLOOR[max(s.grade for s in sides)]
    near = compare("embeddings", emb(rows), emb(tilted(rows, floor - 0.001)), *sides)
    assert near.verdict is Verdict.DISAGREE


def test_embeddings_one_bad_row_among_good_ones_disagrees() -> None:
    rows = unit_rows(0, n=8)
    lied = rows.copy()
    lied[5] = unit_rows(9, n=1)[0]
    got = compare("embeddings", emb(rows), emb(lied), FP32, FP32)
    assert got.verdict is Verdict.DISAGREE and "row 5" in got.why


def test_embeddings_norm_shape_nan_and_token_counts() -> None:
    rows = unit_rows(0)
    tokens = Tensor.from_numpy(np.array([3, 4, 5, 6], dtype=np.int64))
    fewer = Tensor.from_numpy(np.array([3, 4, 5, 7], dtype=np.int64))
    assert compare("embeddings", emb(rows), emb(rows * 1.5), FP32, FP32).verdict is Verdict.DISAGREE
    assert compare("embeddings", emb(rows), emb(rows[:3]), FP32, FP32).verdict is Verdict.DISAGREE
    nan = rows.copy()
    nan[0, 0] = np.nan
    assert compare("embeddings", emb(rows), emb(nan), FP32, FP32).verdict is Verdict.DISAGREE
    assert compare("embeddings", emb(nan), emb(nan), FP32, FP32).verdict is Verdict.UNSURE
    same = compare("embeddings", emb(rows, tokens=tokens), emb(rows, tokens=tokens), FP32, FP32)
    assert same.verdict is Verdict.AGREE
    off = compare("embeddings", emb(rows, tokens=tokens), emb(rows, tokens=fewer), FP32, FP32)
    assert off.verdict is Verdict.DISAGREE and "tokens" in off.why
    missing = compare("embeddings", emb(rows), {"tokens": tokens}, FP32, FP32)
    assert missing.verdict is Verdict.DISAGREE
    zero = np.zeros_like(rows)
    assert compare("embeddings", emb(zero), emb(zero), FP32, FP32).verdict is Verdict.AGREE
    assert compare("embeddings", emb(zero), emb(rows), FP32, FP32).verdict is Verdict.DISAGREE


def test_fake_outputs_compare_floats_and_text() -> None:
    rows = unit_rows(0, dim=8)
    assert compare("fake", emb(rows, text="alpha "), emb(rows, text="alpha "), FAKE, FAKE).agrees
    got = compare("fake", emb(rows, text="alpha "), emb(rows, text="bravo "), FAKE, FAKE)
    assert got.verdict is Verdict.DISAGREE and "text" in got.why


def classes(*rows: list[int], scores: list[list[float]] | None = None) -> dict[str, object]:
    out: dict[str, object] = {"indices": Tensor.from_numpy(np.array(rows, dtype=np.int64))}
    if scores is not None:
        out["scores"] = Tensor.from_numpy(np.array(scores, dtype=np.float32))
    return out


def test_classification_top1_near_ties_and_scores() -> None:
    task = "image-classification"
    a = classes([1, 2, 3, 4, 5], [7, 8, 9, 10, 11])
    assert compare(task, a, classes([1, 2, 3, 4, 5], [7, 8, 9, 10, 11]), FP32, FP32).agrees
    # Top-1 equal, the tail reordered: agree.
    assert compare(task, a, classes([1, 3, 2, 5, 4], [7, 9, 8, 11, 10]), FP32, INT8).agrees
    # Two classes a hair apart swapped under another precision: unsure, not a strike.
    swap = compare(task, a, classes([2, 1, 3, 4, 5], [7, 8, 9, 10, 11]), FP32, INT8)
    assert swap.verdict is Verdict.UNSURE and "near tie" in swap.why
    # A top-1 the other side does not even have in its top-5: a wrong answer.
    wrong = compare(task, a, classes([1, 2, 3, 4, 5], [500, 8, 9, 10, 11]), FP32, INT8)
    assert wrong.verdict is Verdict.DISAGREE and "image 1" in wrong.why
    assert compare(task, a, classes([1, 2, 3]), FP32, FP32).verdict is Verdict.DISAGREE
    assert compare(task, a, {}, FP32, FP32).verdict is Verdict.DISAGREE
    scored = classes([1, 2], scores=[[0.9, 0.05]])
    near = classes([1, 2], scores=[[0.895, 0.052]])
    far = classes([1, 2], scores=[[0.5, 0.4]])
    assert compare(task, scored, near, FP32, FP32).agrees
    assert compare(task, scored, far, FP32, FP32).verdict is Verdict.UNSURE


def test_greedy_generation_by_text() -> None:
    task = "text-generation"
    text = "The capital of France is Paris. It lies on the Seine and has two million people."
    assert compare(task, {"text": text}, {"text": text}, FP32, FP32).agrees
    early = text[:5] + "X" + text[6:]
    late = text[:60] + "X" + text[61:]
    assert compare(task, {"text": text}, {"text": early}, FP32, FP32).verdict is Verdict.DISAGREE
    # A late split, or any split between two precisions, is a near tie followed.
    assert compare(task, {"text": text}, {"text": late}, FP32, FP32).verdict is Verdict.UNSURE
    assert compare(task, {"text": text}, {"text": early}, FP32, INT8).verdict is Verdict.UNSURE
    assert compare(task, {"text": text}, {"text": text[:30]}, FP32, FP32).verdict is Verdict.UNSURE
    assert compare(task, {"text": text}, {}, FP32, FP32).verdict is Verdict.DISAGREE


def test_which_jobs_can_be_checked() -> None:
    job = Request("q", "m", {"text": "hi"})
    gen = Side("openvino-genai", "int4", "")
    assert uncheckable("embeddings", job, FP32) is None
    assert uncheckable("fake", job, FAKE) is None
    assert uncheckable("text-generation", job, gen) is None  # greedy by default
    hot = Request("q", "m", {"prompt": "hi"}, params={"temperature": 0.7})
    assert "sampled" in str(uncheckable("text-generation", hot, gen))
    cold = Request("q", "m", {"prompt": "hi"}, params={"temperature": 0})
    assert uncheckable("text-generation", cold, REMOTE) is None
    assert "sampled" in str(uncheckable("text-generation", job, REMOTE))  # a server's default
    assert "streamed" in str(uncheckable("embeddings", Request("q", "m", {}, stream=True), FP32))
    assert "deterministic" in str(uncheckable("object-detection", job, FP32))
    assert uncheckable("embeddings", Request("q", "m", {}, idempotent=False), FP32) is not None


# -- the strike rule ----------------------------------------------------------------------


def answers(*spec: tuple[str, bool, np.ndarray]) -> list[Answer]:
    return [Answer(node, local, FP32, emb(rows)) for node, local, rows in spec]


RIGHT = unit_rows(0)
NOISY = tilted(RIGHT, 0.99999)
WRONG = unit_rows(3)
OTHER_WRONG = unit_rows(4)


def test_this_node_is_the_ground_truth() -> None:
    got = judge("embeddings", answers(("me", True, RIGHT), ("p", False, WRONG)))
    assert got.verdict is Verdict.DISAGREE
    assert got.outcomes == {"p": Outcome.STRUCK} and got.standing == ("me",)
    # Even against a majority of peers that agree with each other.
    many = answers(
        ("p", False, WRONG), ("q", False, WRONG), ("me", True, RIGHT), ("r", False, NOISY)
    )
    got = judge("embeddings", many)
    assert got.outcomes == {"p": Outcome.STRUCK, "q": Outcome.STRUCK, "r": Outcome.AGREED}
    assert got.standing == ("me", "r") and set(got.against) == {"p", "q"}


def test_two_peers_that_disagree_are_disputed_not_struck() -> None:
    got = judge("embeddings", answers(("p", False, RIGHT), ("q", False, WRONG)))
    assert got.verdict is Verdict.DISAGREE and got.standing == ()
    assert got.outcomes == {"p": Outcome.DISPUTED, "q": Outcome.DISPUTED}
    agree = judge("embeddings", answers(("p", False, RIGHT), ("q", False, NOISY)))
    assert agree.verdict is Verdict.AGREE
    assert agree.outcomes == {"p": Outcome.AGREED, "q": Outcome.AGREED}


def test_a_majority_of_three_strikes_the_odd_one_out() -> None:
    got = judge(
        "embeddings", answers(("p", False, WRONG), ("q", False, RIGHT), ("r", False, NOISY))
    )
    assert got.outcomes == {"p": Outcome.STRUCK, "q": Outcome.AGREED, "r": Outcome.AGREED}
    assert got.standing == ("q", "r") and got.verdict is Verdict.DISAGREE
    # Three different answers: no majority, nobody struck.
    none = judge(
        "embeddings", answers(("p", False, WRONG), ("q", False, RIGHT), ("r", False, OTHER_WRONG))
    )
    assert none.standing == () and Outcome.STRUCK not in none.outcomes.values()


def test_honest_noise_never_strikes() -> None:
    sides = (FP32, BF16, FP16, INT8)
    rows = [tilted(RIGHT, c, seed=i) for i, c in enumerate((1.0, 0.99996, 0.99999, 0.9975))]
    got = judge(
        "embeddings",
        [
            Answer(f"n{i}", i == 0, s, emb(r))
            for i, (s, r) in enumerate(zip(sides, rows, strict=True))
        ],
    )
    assert got.verdict is Verdict.AGREE
    assert set(got.outcomes.values()) == {Outcome.AGREED}


def test_judge_refuses_what_it_cannot_judge() -> None:
    with pytest.raises(ValueError):
        judge("embeddings", answers(("p", False, RIGHT)))
    with pytest.raises(ValueError):
        judge("embeddings", answers(("p", False, RIGHT), ("p", False, RIGHT)))
