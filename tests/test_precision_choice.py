"""The measured (auto) precision of OpenVINO runners: planning, checks, the decision,
its cache, and all-MiniLM-L6-v2 choosing on the real model.

EfficientNet-Lite0's auto precision is tested with its other tests in
test_classify.py. The real tests share conftest's session ``models_dir``, which
the default (auto) load made; the ones that measure again work on hard-linked
copies of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import NodeFactory
from test_runner_openvino import TEXTS

from node.cli.render import status_text
from protocols import Tensor
from protocols.config import Table
from protocols.errors import ConfigError
from runners import ov_choice
from runners.catalog import ModelSpecError, parse_model_spec
from runners.openvino_embed import (
    AUTO_MIN_COSINE,
    MODEL_NAME,
    EmbedConfig,
    OpenVINOEmbedRunner,
)
from runners.ov_choice import (
    Candidate,
    Choice,
    ClassificationCheck,
    DeviceFacts,
    EmbeddingCheck,
    Trial,
)
from runners.ov_classify import OVClassifyConfig

# What OpenVINO 2026.4 reports: this Xeon (AMX, avx512_bf16, avx512_fp16) and an
# AMD EPYC of the development machines before it (no bf16 of any kind).
XEON = ("BF16", "WINOGRAD", "FP32", "FP16", "INT8", "BIN", "EXPORT_IMPORT")
EPYC = ("WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT")


def facts(capabilities: tuple[str, ...]) -> DeviceFacts:
    return DeviceFacts("CPU", "a CPU", capabilities)


def labels(plan: ov_choice.Plan) -> list[str]:
    return [c.label for c in plan.candidates]


# --------------------------------------------------------------------------- planning


def test_the_device_capabilities_decide_what_is_tried() -> None:
    assert ov_choice.offered(XEON) == ("f32", "bf16", "f16")
    assert ov_choice.offered(EPYC) == ("f32",)
    plan = ov_choice.plan("auto", "auto", facts(XEON), "CPU")
    assert plan.mode == "auto" and plan.safe == Candidate("fp32", "f32")
    assert labels(plan) == [
        "fp32/f32",
        "fp32/bf16",
        "fp32/f16",
        "int8/f32",
        "int8/bf16",
        "int8/f16",
    ]


def test_a_cpu_without_bf16_only_tries_f32() -> None:
    """AMD EPYC: the weights are still measured, the arithmetic stays f32."""
    plan = ov_choice.plan("auto", "auto", facts(EPYC), "CPU")
    assert labels(plan) == ["fp32/f32", "int8/f32"]
    alone = ov_choice.plan("fp32", "auto", facts(EPYC), "CPU")
    assert labels(alone) == ["fp32/f32"] and alone.mode == "auto"
    assert "offers nothing faster" in alone.why


def test_a_pinned_setting_is_the_only_value_tried_for_it() -> None:
    assert labels(ov_choice.plan("fp32", "bf16", facts(XEON), "CPU")) == ["fp32/bf16"]
    assert ov_choice.plan("fp32", "bf16", facts(XEON), "CPU").mode == "pinned"
    assert labels(ov_choice.plan("auto", "bf16", facts(XEON), "CPU")) == [
        "fp32/bf16",  # the safe one keeps the pinned arithmetic
        "int8/bf16",
    ]
    assert labels(ov_choice.plan("int8", "auto", facts(XEON), "CPU")) == [
        "int8/f32",
        "int8/bf16",
        "int8/f16",
    ]


def test_a_device_that_cannot_be_asked_is_not_measured() -> None:
    plan = ov_choice.plan("auto", "auto", None, "AUTO:GPU,CPU")
    assert labels(plan) == ["fp32/f32"] and "cannot be measured" in plan.why
    assert labels(ov_choice.plan("int8", "bf16", None, "GPU")) == ["int8/bf16"]
    assert ov_choice.device_facts("AUTO:CPU") is None
    assert ov_choice.device_facts("NOSUCHDEVICE") is None
    cpu = ov_choice.device_facts("CPU")
    assert cpu is not None and "FP32" in cpu.capabilities


# --------------------------------------------------------------------------- checks


def unit_rows(n: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, 384))
    normalized: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return normalized


def test_the_embedding_check_holds_every_row_to_the_floor() -> None:
    check = EmbeddingCheck(0.999)
    reference = unit_rows(4, 1)
    assert check.judge(reference, reference).passed
    drift = reference + 0.02 * unit_rows(4, 2)  # cosine ~0.9998
    verdict = check.judge(reference, drift.astype(np.float32))
    assert verdict.passed and 0.999 < verdict.figures["cosine_min"] < 1.0
    one_bad = reference.copy()
    one_bad[2] = unit_rows(1, 3)[0]  # one row elsewhere: the minimum is that row
    verdict = check.judge(reference, one_bad)
    assert not verdict.passed and verdict.figures["cosine_min"] < 0.5
    nan = reference.copy()
    nan[0, 0] = np.nan
    assert not check.judge(reference, nan).passed
    assert not check.judge(reference, reference[:3]).passed


def logits_ranked(*order: int) -> np.ndarray:
    """One row of 10 logits whose classes rank in ``order`` (best first)."""
    row = np.zeros(10)
    for rank, cls in enumerate(order):
        row[cls] = 10.0 - rank
    return row


def test_the_classification_check_wants_the_same_top1_and_most_of_the_top5() -> None:
    check = ClassificationCheck(min_top5=4)
    reference = np.stack([logits_ranked(0, 1, 2, 3, 4, 5), logits_ranked(9, 8, 7, 6, 5, 4)])
    same = check.judge(reference, reference)
    assert same.passed and same.figures["top1_equal"] == 2 and same.figures["top5_min"] == 5
    four = np.stack([logits_ranked(0, 1, 2, 3, 5, 4), reference[1]])  # ranks 5 and 6 swap
    assert check.judge(reference, four).passed
    three = np.stack([logits_ranked(0, 1, 2, 5, 6, 3), reference[1]])
    assert not check.judge(reference, three).passed
    flipped = np.stack([logits_ranked(1, 0, 2, 3, 4, 5), reference[1]])  # top-5 intact
    verdict = check.judge(reference, flipped)
    assert not verdict.passed and verdict.figures["top1_equal"] == 1
    strict = ClassificationCheck(min_top5=4, min_cosine=1.0)
    assert not strict.judge(reference, reference + 0.01 * np.arange(10)).passed
    assert "logit cosine >= 1" in strict.describe()


# --------------------------------------------------------------------------- deciding


SAFE = Candidate("fp32", "f32")
BF16 = Candidate("fp32", "bf16")
INT8 = Candidate("int8", "f32")
PLAN = ov_choice.Plan((SAFE, BF16, INT8), "auto")


def tried(candidate: Candidate, passed: bool, speedup: float, cosine: float = 0.9999) -> Trial:
    """A trial at ``speedup`` over a safe candidate doing 100 rows/s."""
    return Trial(candidate, passed, 100.0 * speedup, speedup, {"cosine_min": cosine})


def test_the_fastest_candidate_that_passed_wins() -> None:
    trials = [tried(SAFE, True, 1.0), tried(BF16, True, 2.8), tried(INT8, True, 1.9)]
    winner, why = ov_choice.decide(PLAN, trials)
    assert winner == BF16 and "2.80x fp32/f32" in why
    failing = [tried(SAFE, True, 1.0), tried(BF16, False, 2.8), tried(INT8, True, 1.9)]
    assert ov_choice.decide(PLAN, failing)[0] == INT8


def test_of_candidates_about_as_fast_the_closest_to_fp32_wins() -> None:
    """int8/f32 is 3% faster than fp32/bf16 here, inside what a few runs can tell."""
    close = [
        tried(SAFE, True, 1.0),
        tried(BF16, True, 2.8, 0.99998),
        tried(INT8, True, 2.9, 0.9993),
    ]
    winner, why = ov_choice.decide(PLAN, close)
    assert winner == BF16 and "closest to fp32/f32 of 2 within 1.05x" in why
    apart = [
        tried(SAFE, True, 1.0),
        tried(BF16, True, 2.5, 0.99998),
        tried(INT8, True, 2.9, 0.9993),
    ]
    assert ov_choice.decide(PLAN, apart)[0] == INT8


def test_the_safe_candidate_is_kept_when_nothing_faster_passed() -> None:
    none_passed = [tried(SAFE, True, 1.0), tried(BF16, False, 2.8), tried(INT8, False, 1.9)]
    winner, why = ov_choice.decide(PLAN, none_passed)
    assert winner == SAFE and "no faster candidate passed" in why
    broken = [tried(SAFE, True, 1.0), Trial(BF16, False, error="does not compile")]
    assert ov_choice.decide(PLAN, broken)[0] == SAFE
    tie = [tried(SAFE, True, 1.0), tried(BF16, True, 1.03), tried(INT8, True, 0.8)]
    winner, why = ov_choice.decide(PLAN, tie)
    assert winner == SAFE and "needs 1.05x" in why


def test_a_choice_reads_back_as_written(tmp_path: Path) -> None:
    trials = (
        Trial(SAFE, True, 100.0, 1.0, {"cosine_min": 1.0}),
        Trial(BF16, True, 280.0, 2.8, {"cosine_min": 0.99998}),
        Trial(INT8, False, error="does not convert"),
    )
    choice = Choice(BF16, "auto", "measured", "fastest", "cosine >= 0.999", trials, 1.0, "CPU: x")
    ov_choice.write_choice(tmp_path, "k1", choice)
    back = ov_choice.read_choice(tmp_path, "k1")
    assert back is not None and back.source == "cache"
    assert back.describe() == {**choice.describe(), "source": "cache"}
    assert ov_choice.read_choice(tmp_path, "k2") is None  # another key
    ov_choice.choice_path(tmp_path, "k3").write_text('{"key": "k3", "chosen": "fp32/f99"}')
    assert ov_choice.read_choice(tmp_path, "k3") is None  # not ours: measured again
    ov_choice.choice_path(tmp_path, "k4").write_text("{")
    assert ov_choice.read_choice(tmp_path, "k4") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "precision-k1.json",
        "precision-k3.json",
        "precision-k4.json",
    ]  # no staging file left behind


# --------------------------------------------------------------------------- config


def test_auto_is_the_default_only_where_it_can_be_measured() -> None:
    embed = parse_model_spec("all-minilm-l6-v2").config
    assert (embed.precision, embed.inference_precision) == ("auto", "auto")
    assert embed.auto_min_cosine == AUTO_MIN_COSINE
    classify = parse_model_spec("efficientnet-lite0").config
    assert (classify.options.precision, classify.options.inference_precision) == ("auto", "auto")
    assert classify.auto_min_top5 == 4
    own = "openvino:name=mine,path=/m/x.xml,task=classify"
    assert parse_model_spec(own).config.options.precision == "fp32"
    with pytest.raises(ModelSpecError, match=r"\.precision: expected one of"):
        parse_model_spec(own + ",precision=auto")  # nothing to check it against
    with pytest.raises(ModelSpecError, match=r"\.auto_min_cosine: expected a number from 0 to 1"):
        parse_model_spec("openvino-embed:auto_min_cosine=2")
    with pytest.raises(ConfigError, match=r"models\[0\]\.auto_min_top5"):
        OVClassifyConfig.from_table(Table({"auto_min_top5": 6}, "models[0]"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.inference_precision"):
        OVClassifyConfig.from_table(Table({"inference_precision": "int8"}, "models[0]"))


# --------------------------------------------------------------------------- the real model


def linked_copy(models_dir: Path, dest: Path) -> Path:
    """A private, hard-linked copy of the session's models dir (entries and choice)."""
    shutil.copytree(models_dir / MODEL_NAME, dest / MODEL_NAME, copy_function=os.link)
    return dest


def trials_of(runner: Any) -> dict[str, dict[str, Any]]:
    status = runner.status()
    assert status is not None
    return {t["candidate"]: t for t in status["precision"]["candidates"]}


@pytest.mark.slow
async def test_auto_chooses_a_candidate_that_passed_its_check(models_dir: Path) -> None:
    """The session's first load measured; this one reads its choice and opens it."""
    runner = OpenVINOEmbedRunner(models_dir)
    await runner.load()
    status = runner.status()
    assert status is not None
    precision = status["precision"]
    assert precision["mode"] == "auto" and precision["source"] == "cache"
    assert precision["check"] == "cosine >= 0.999 per probe row"
    trials = trials_of(runner)
    cpu = ov_choice.device_facts("CPU")
    assert cpu is not None
    want = [c.label for c in ov_choice.plan("auto", "auto", cpu, "CPU").candidates]
    assert list(trials) == want  # on this Xeon: bf16 and f16 too
    for trial in trials.values():  # the recorded figures agree with the verdicts
        assert trial["passed"] == (trial["cosine_min"] >= AUTO_MIN_COSINE), trial
        assert trial["rows_per_s"] > 0
    chosen = trials[precision["chosen"]]
    assert chosen["passed"] and chosen["cosine_min"] >= AUTO_MIN_COSINE
    assert trials["fp32/f32"]["speedup"] == 1.0
    recorded = [Trial.from_json(t) for t in trials.values()]  # the rule, on the figures kept
    plan = ov_choice.plan("auto", "auto", cpu, "CPU")
    assert ov_choice.decide(plan, recorded)[0].label == precision["chosen"]
    assert (runner.info.precision, runner.info.extra["inference_precision"]) == (
        precision["weights"],
        precision["inference"],
    )
    assert status["summary"].startswith(f"precision {precision['chosen']} (auto")
    # Texts the probe never saw (one of 256 tokens of a repeated word): the choice
    # keeps them within the floor of fp32/f32 too.
    reference = OpenVINOEmbedRunner(
        models_dir, EmbedConfig(precision="fp32", inference_precision="f32")
    )
    await reference.load()
    got, want = [(await r.infer({"text": TEXTS}, {}))["embedding"] for r in (runner, reference)]
    assert isinstance(got, Tensor) and isinstance(want, Tensor)
    cosine = np.sum(got.numpy() * want.numpy(), axis=1)
    assert cosine.min() >= AUTO_MIN_COSINE, cosine
    await runner.close()
    await reference.close()


@pytest.mark.slow
async def test_an_explicit_precision_is_used_as_written(models_dir: Path, tmp_path: Path) -> None:
    pinned = OpenVINOEmbedRunner(
        models_dir, EmbedConfig(precision="fp32", inference_precision="bf16")
    )
    await pinned.load()
    status = pinned.status()
    assert status is not None
    assert status["precision"] == {
        "chosen": "fp32/bf16",
        "weights": "fp32",
        "inference": "bf16",
        "mode": "pinned",
        "source": "fixed",
        "why": "set in the config",
    }
    assert pinned.info.extra["inference_precision"] == "bf16"
    await pinned.close()
    # Half pinned: the weights are measured, the arithmetic stays as written.
    half = OpenVINOEmbedRunner(
        linked_copy(models_dir, tmp_path), EmbedConfig(inference_precision="f32")
    )
    await half.load()
    assert list(trials_of(half)) == ["fp32/f32", "int8/f32"]
    assert half.info.extra["inference_precision"] == "f32"
    await half.close()


@pytest.mark.slow
async def test_a_check_nothing_can_pass_falls_back_to_fp32(
    models_dir: Path, tmp_path: Path
) -> None:
    """cosine 1.0 on every row: no reduced precision meets it, so fp32/f32 is kept,
    with the figures of the ones that failed."""
    copy = linked_copy(models_dir, tmp_path)
    runner = OpenVINOEmbedRunner(copy, EmbedConfig(auto_min_cosine=1.0))
    await runner.load()
    status = runner.status()
    assert status is not None
    precision = status["precision"]
    assert (precision["chosen"], precision["source"]) == ("fp32/f32", "measured")
    assert "no faster candidate passed" in precision["why"]
    others = [t for label, t in trials_of(runner).items() if label != "fp32/f32"]
    assert others and all(not t["passed"] and t["cosine_min"] < 1.0 for t in others)
    assert (runner.info.precision, runner.info.extra["inference_precision"]) == ("fp32", "f32")
    await runner.close()


@pytest.mark.slow
async def test_the_cached_choice_is_reused_without_measuring(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = linked_copy(models_dir, tmp_path)
    config = EmbedConfig(auto_min_cosine=0.9995)  # another check: a key of its own
    first = OpenVINOEmbedRunner(copy, config)
    await first.load()
    first_status = first.status()
    assert first_status is not None and first_status["precision"]["source"] == "measured"
    await first.close()
    (kept,) = [
        p
        for p in (copy / MODEL_NAME).glob(f"{ov_choice.CHOICE_PREFIX}*.json")
        if p.stat().st_nlink == 1  # ours, not the session's hard-linked one
    ]
    before = kept.stat()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured again")

    monkeypatch.setattr(ov_choice, "Bench", refuse)
    second = OpenVINOEmbedRunner(copy, config)
    await second.load()
    second_status = second.status()
    assert second_status is not None
    assert second_status["precision"] == {**first_status["precision"], "source": "cache"}
    after = kept.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    got = await second.infer({"text": ["a sentence", "another one"]}, {})
    assert got["embedding"] is not None
    await second.close()


@pytest.mark.slow
async def test_swarm_status_shows_the_choice_and_why(
    node_factory: NodeFactory, models_dir: Path, tmp_path: Path
) -> None:
    """A real node serving the default model: its status (``swarm status --json``)
    carries the runner's choice with its figures, and the text says what and why."""
    linked_copy(models_dir, tmp_path / "real" / "models")
    async with node_factory("real", models=(MODEL_NAME,)) as node:
        body = node.status()
    state = body["view"]["runners"][MODEL_NAME]
    precision = state["precision"]
    assert precision["mode"] == "auto" and precision["source"] == "cache"
    assert {t["candidate"] for t in precision["candidates"]} >= {"fp32/f32", "int8/f32"}
    (model,) = body["models"]
    assert (model["precision"], model["inference_precision"]) == (
        precision["weights"],
        precision["inference"],
    )
    text = " ".join(status_text(body.pop("peer_id"), body).split())
    head = f"precision {precision['chosen']} (auto, measured earlier): "
    assert f"backend {MODEL_NAME}: {head}" in text
    assert precision["why"] in text
