"""Choosing the precision an OpenVINO model runs at, by measuring it on this device.

Two settings make a precision (see ``ov_device``): the stored weights (fp32,
int8, ...) and what the device computes in (f32, bf16, f16). A runner that has
a reference to check against (all-MiniLM-L6-v2, EfficientNet-Lite0) leaves
either one at ``auto`` by default, and this module picks it:

1. ``plan``: the candidates. ``auto`` weights try fp32 and int8 (fp16 weights
   are decompressed at compile time: no faster than fp32, only less exact);
   an ``auto`` inference precision tries f32 and whatever the device lists in
   ``OPTIMIZATION_CAPABILITIES`` (``BF16``: AMX or avx512_bf16 Xeons; ``FP16``).
   A value the user wrote is the only one tried for that setting. The first
   candidate, fp32/f32 or what the user pinned at full precision, is the
   *safe* one: the reference every other is checked against, and the fallback.
2. ``Bench``: each candidate runs a handful of fixed probe rows once (its
   outputs are checked against the safe candidate's by the model's ``Check``:
   embedding cosine, or top-1/top-5 agreement), then a few timed runs of a
   batch of 8 typical rows in rounds alternating with the safe candidate, so
   other work on the machine falls on both alike: its speedup is the ratio.
3. ``decide``: the candidate that passed with the best speedup, if that is at
   least ``MIN_GAIN`` (a smaller gain is within the noise of a few runs and
   not worth any drift); else the safe one. Of candidates within ``MIN_GAIN``
   of the best, the one closest to the reference wins.

The choice, its figures and why, is kept as ``precision-<key>.json`` in the
model's dir of the models cache, keyed by everything that could change the
answer (model files, device name and capabilities, OpenVINO version,
candidates, check thresholds, hint), so a restart opens the chosen candidate
only and measures nothing; delete the file to measure again (say, after a
first start on a busy machine). A device that cannot be asked (a virtual one
such as ``AUTO:GPU,CPU``, or one that is not here) is not measured: the safe
candidate is used, and ``compile_for`` reports an absent device as before.

Errors: the safe candidate's failures (conversion, compilation, its probe)
are the runner's ``ModelLoadError``; any other candidate that cannot be
converted, compiled or run is recorded as failed and skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import math
import os
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import openvino as ov
import trio

from . import ir_cache, ov_device
from .errors import ModelLoadError

log = logging.getLogger(__name__)
T = TypeVar("T")
Array = np.ndarray[Any, Any]
Feed = Mapping[str, Array]

AUTO = ov_device.AUTO
AUTO_WEIGHTS = ("fp32", "int8")
# A faster candidate must beat the safe one by this much: a few timed runs on a
# shared machine scatter by a few percent, and a precision that only ties is not
# worth its drift.
MIN_GAIN = 1.05
ROUNDS = 3  # alternating rounds of timed runs
RUNS = 2  # timed runs per candidate per round
# Bump when the probes, the rounds or the decision rule change: cached choices are redone.
RULE = "1"
CHOICE_PREFIX = "precision-"


@dataclass(frozen=True, slots=True, order=True)
class Candidate:
    weights: str  # fp32, fp16, int8: what the IR stores
    inference: str  # f32, bf16, f16: what the device computes in

    @property
    def label(self) -> str:
        return f"{self.weights}/{self.inference}"

    @classmethod
    def parse(cls, label: str) -> Candidate:
        weights, sep, inference = label.partition("/")
        if not sep or weights not in ov_device.PRECISIONS:
            raise ValueError(f"not a candidate: {label!r}")
        if inference not in ov_device.INFERENCE_PRECISIONS or inference == AUTO:
            raise ValueError(f"not a candidate: {label!r}")
        return cls(weights, inference)


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What OpenVINO says of a physical device."""

    device: str
    name: str  # FULL_DEVICE_NAME, e.g. "Intel(R) Xeon(R) Processor"
    capabilities: tuple[str, ...]  # OPTIMIZATION_CAPABILITIES, e.g. ("BF16", "FP32", ...)


def device_facts(device: str) -> DeviceFacts | None:
    """The facts of physical ``device``; None for a virtual or absent one. Blocks."""
    virtual, _ = ov_device.candidates(device)
    if virtual:
        return None
    core = ov.Core()
    try:
        if not ov_device.is_present(device, list(core.available_devices)):
            return None
        name = str(core.get_property(device, "FULL_DEVICE_NAME"))
        capabilities = tuple(str(c) for c in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # a plugin that cannot answer: nothing to measure with
        return None
    return DeviceFacts(device, name, capabilities)


def offered(capabilities: Sequence[str]) -> tuple[str, ...]:
    """The inference precisions worth trying on a device with ``capabilities``, f32 first."""
    extra = [p for cap, p in (("BF16", "bf16"), ("FP16", "f16")) if cap in capabilities]
    return ("f32", *extra)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to try. ``candidates[0]`` is the safe one (reference and fallback)."""

    candidates: tuple[Candidate, ...]
    mode: str  # "auto" (something was left to choose) or "pinned"
    why: str = ""  # why there is only one candidate, when there is
    facts: DeviceFacts | None = None

    @property
    def safe(self) -> Candidate:
        return self.candidates[0]


def plan(weights: str, inference: str, facts: DeviceFacts | None, device: str) -> Plan:
    """The candidates for the configured ``weights`` and ``inference`` (either may be auto)."""
    mode = AUTO if AUTO in (weights, inference) else "pinned"
    all_weights = AUTO_WEIGHTS if weights == AUTO else (weights,)
    if facts is None:
        safe = Candidate(all_weights[0], "f32" if inference == AUTO else inference)
        why = "" if mode == "pinned" else f"{device} cannot be measured (virtual or absent)"
        return Plan((safe,), mode, why)
    inferences = offered(facts.capabilities) if inference == AUTO else (inference,)
    found = tuple(Candidate(w, i) for w in all_weights for i in inferences)
    why = ""
    if mode == AUTO and len(found) == 1:
        why = f"{device} offers nothing faster ({', '.join(facts.capabilities)})"
    return Plan(found, mode, why, facts)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    figures: Mapping[str, float]


class Check(Protocol):
    """How close a candidate's probe outputs must come to the safe candidate's."""

    def judge(self, reference: Array, got: Array) -> Verdict: ...
    def describe(self) -> str: ...


def _down(value: float) -> float:
    """``value`` to 6 decimals, rounded down: a minimum shown never reaches a floor
    it missed (0.9999996 against 1.0 reads 0.999999, not 1.0)."""
    return math.floor(value * 1e6 + 1e-6) / 1e6  # + a hair: 1 - 2e-16 is still 1


def _cosines(reference: Array, got: Array) -> Array:
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(got, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    result: Array = np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)
    return result


@dataclass(frozen=True, slots=True)
class EmbeddingCheck:
    """Every probe row's cosine to the reference at least ``min_cosine``."""

    min_cosine: float

    def judge(self, reference: Array, got: Array) -> Verdict:
        if got.shape != reference.shape or not np.isfinite(got).all():
            return Verdict(False, {"cosine_min": 0.0})
        low = float(np.min(_cosines(reference, got)))
        return Verdict(low >= self.min_cosine, {"cosine_min": _down(low)})

    def describe(self) -> str:
        return f"cosine >= {self.min_cosine:g} per probe row"


@dataclass(frozen=True, slots=True)
class ClassificationCheck:
    """On every probe: the same top-1 class, at least ``min_top5`` of the same top-5
    classes, and logits at cosine ``min_cosine`` or more (0: not checked)."""

    min_top5: int = 4
    min_cosine: float = 0.0

    def judge(self, reference: Array, got: Array) -> Verdict:
        if got.shape != reference.shape or not np.isfinite(got).all():
            return Verdict(False, {"top1_equal": 0.0, "top5_min": 0.0, "cosine_min": 0.0})
        top1 = int(np.sum(np.argmax(got, axis=1) == np.argmax(reference, axis=1)))
        top5 = min(
            len(set(np.argsort(-g)[:5].tolist()) & set(np.argsort(-r)[:5].tolist()))
            for g, r in zip(got, reference, strict=True)
        )
        low = float(np.min(_cosines(reference, got)))
        passed = top1 == len(reference) and top5 >= self.min_top5 and low >= self.min_cosine
        figures = {"top1_equal": top1, "probes": len(reference), "top5_min": top5}
        return Verdict(passed, {**figures, "cosine_min": _down(low)})

    def describe(self) -> str:
        text = f"top-1 equal and top-5 overlap >= {self.min_top5}/5 per probe"
        return text + (f", logit cosine >= {self.min_cosine:g}" if self.min_cosine else "")


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class Trial:
    """One candidate's figures: its check, and its speed on the probe batch, also as a
    ratio to the safe candidate timed in the same window (what the decision uses)."""

    candidate: Candidate
    passed: bool
    rows_per_s: float | None = None
    speedup: float | None = None
    figures: Mapping[str, float] = field(default_factory=dict)
    error: str = ""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"candidate": self.candidate.label, "passed": self.passed}
        if self.rows_per_s is not None:
            out["rows_per_s"] = round(self.rows_per_s, 1)
        if self.speedup is not None:
            out["speedup"] = round(self.speedup, 3)
        out.update(self.figures)
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trial:
        rows, speedup = data.get("rows_per_s"), data.get("speedup")
        reserved = {"candidate", "passed", "rows_per_s", "speedup", "error"}
        figures = {k: v for k, v in data.items() if k not in reserved}
        return cls(
            Candidate.parse(str(data["candidate"])),
            bool(data["passed"]),
            None if rows is None else float(rows),
            None if speedup is None else float(speedup),
            {k: v if isinstance(v, int) else float(v) for k, v in figures.items()},
            str(data.get("error", "")),
        )


class Bench:
    """The safe candidate's probe outputs and infer request: every other candidate is
    checked against those outputs and timed beside that request, in alternating
    rounds, so other work on the machine falls on both alike. All methods block.

    Each candidate gets an infer request of its own, which copies the inputs in
    (a compiled model's ``__call__`` would share them, and OpenVINO may reuse
    shared input memory for later work, changing the probe under us).
    """

    def __init__(
        self,
        safe: Candidate,
        compiled: Any,
        feeds: tuple[Feed, Feed],
        check: Check,
        *,
        rounds: int = ROUNDS,
    ) -> None:
        self.safe = safe
        self.check = check
        self.rounds = rounds
        self.probe, self.feed = dict(feeds[0]), dict(feeds[1])
        self.rows = len(next(iter(self.feed.values())))
        self.times: list[float] = []  # the safe candidate's, over every window
        try:
            self.request = compiled.create_infer_request()
            self.reference = np.array(self.request.infer(self.probe)[0], copy=True)
            self.request.infer(self.feed)  # warm-up at the timed shape
        except Exception as exc:
            raise ModelLoadError(f"{safe.label} fails the precision probe: {exc}") from exc

    def _timed(self, request: Any) -> list[float]:
        times = []
        for _ in range(RUNS):
            started = time.perf_counter()
            request.infer(self.feed)
            times.append(time.perf_counter() - started)
        return times

    def trial(self, candidate: Candidate, compiled: Any) -> Trial:
        """Check ``candidate`` and time it against the safe one; a run that fails is
        a failed trial, not an error."""
        try:
            request = compiled.create_infer_request()
            got = np.array(request.infer(self.probe)[0], copy=True)
            request.infer(self.feed)  # warm-up at the timed shape
            mine: list[float] = []
            theirs: list[float] = []
            for _ in range(self.rounds):
                theirs += self._timed(self.request)
                mine += self._timed(request)
        except Exception as exc:
            return Trial(candidate, False, error=f"does not run: {exc}"[:300])
        self.times += theirs
        verdict = self.check.judge(self.reference, got)
        speed = self.rows / statistics.median(mine)
        speedup = statistics.median(theirs) / statistics.median(mine)
        return Trial(candidate, verdict.passed, speed, speedup, verdict.figures)

    def safe_trial(self) -> Trial:
        if not self.times:  # nothing else ran: time it alone
            for _ in range(self.rounds):
                self.times += self._timed(self.request)
        verdict = self.check.judge(self.reference, self.reference)
        speed = self.rows / statistics.median(self.times)
        return Trial(self.safe, True, speed, 1.0, verdict.figures)


# --------------------------------------------------------------------------- deciding


@dataclass(frozen=True, slots=True)
class Choice:
    """The precision a runner uses, how it was reached and the figures behind it."""

    chosen: Candidate
    mode: str  # "auto" or "pinned"
    source: str  # "measured", "cache" (measured by an earlier load) or "fixed" (nothing to try)
    why: str
    check: str = ""
    trials: tuple[Trial, ...] = ()
    measured_at: float | None = None
    device: str = ""

    def describe(self) -> dict[str, Any]:
        """Plain JSON data, for the cache file and ``swarm status``."""
        out: dict[str, Any] = {
            "chosen": self.chosen.label,
            "weights": self.chosen.weights,
            "inference": self.chosen.inference,
            "mode": self.mode,
            "source": self.source,
            "why": self.why,
        }
        if self.trials:
            out.update(
                check=self.check,
                device=self.device,
                measured_at=self.measured_at,
                candidates=[t.describe() for t in self.trials],
            )
        return out

    def summary(self) -> str:
        """One line for ``swarm status``."""
        head = f"precision {self.chosen.label} ({self.mode}"
        if self.source == "cache":
            head += ", measured earlier"
        return f"{head}): {self.why}" if self.why else f"{head})"

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str) -> Choice:
        """Raises ValueError, KeyError or TypeError on data this module did not write."""
        trials = tuple(Trial.from_json(t) for t in data.get("candidates", ()))
        measured = data.get("measured_at")
        return cls(
            Candidate.parse(str(data["chosen"])),
            str(data["mode"]),
            source,
            str(data["why"]),
            str(data.get("check", "")),
            trials,
            None if measured is None else float(measured),
            str(data.get("device", "")),
        )


def decide(
    plan: Plan, trials: Sequence[Trial], *, min_gain: float = MIN_GAIN
) -> tuple[Candidate, str]:
    """The candidate to use and why. Pure.

    Of the candidates that passed, the one with the best speedup over the safe
    one, if that is at least ``min_gain``; else the safe one. Candidates within
    ``min_gain`` of the best count as just as fast (a few timed runs cannot
    tell them apart), and of those the one closest to the reference (highest
    ``cosine_min``) wins, so that noise does not trade accuracy for nothing.
    """
    others = [t for t in trials if t.candidate != plan.safe and t.passed and t.speedup]
    if not others:
        return plan.safe, f"no faster candidate passed the check; {plan.safe.label} kept"
    fastest = max(t.speedup or 0.0 for t in others)
    if fastest < min_gain:
        best = max(others, key=lambda t: t.speedup or 0.0)
        return plan.safe, (
            f"{best.candidate.label} passed but ran only {fastest:.2f}x {plan.safe.label} "
            f"(needs {min_gain:g}x); {plan.safe.label} kept"
        )
    tied = [t for t in others if (t.speedup or 0.0) * min_gain >= fastest]
    best = max(tied, key=lambda t: (t.figures.get("cosine_min", 0.0), t.speedup or 0.0))
    why = (
        f"fastest candidate that passed the check, {best.speedup or 0.0:.2f}x "
        f"{plan.safe.label} ({best.rows_per_s or 0.0:.0f} rows/s)"
    )
    if len(tied) > 1:
        why = f"{why}; the closest to {plan.safe.label} of {len(tied)} within {min_gain:g}x"
    return best.candidate, why


# --------------------------------------------------------------------------- the cache


def choice_path(directory: Path, key: str) -> Path:
    return directory / f"{CHOICE_PREFIX}{key}.json"


def read_choice(directory: Path, key: str) -> Choice | None:
    """The cached choice for ``key``, or None when there is none or it does not read."""
    try:
        data = json.loads(choice_path(directory, key).read_text())
        if data.get("key") != key:
            return None
        return Choice.from_json(data, "cache")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_choice(directory: Path, key: str, choice: Choice) -> Path:
    """Keep ``choice`` under ``key``; a reader sees the old file or the new one. Blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    path = choice_path(directory, key)
    staged = directory / f".{CHOICE_PREFIX}{secrets.token_hex(8)}.json"
    try:
        with open(staged, "w") as f:
            json.dump({"key": key, **choice.describe()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return path


def cache_key(plan: Plan, check: Check, parts: Mapping[str, str]) -> str:
    """What a measured choice depends on: ``parts`` (the model's files, the compile
    hint), the device and its capabilities, OpenVINO, the candidates, the check."""
    facts = plan.facts
    return ir_cache.fingerprint(
        {
            **parts,
            "rule": RULE,
            "openvino": importlib.metadata.version("openvino"),
            "device": "" if facts is None else facts.device,
            "device_name": "" if facts is None else facts.name,
            "capabilities": "" if facts is None else ",".join(facts.capabilities),
            "candidates": ",".join(c.label for c in plan.candidates),
            "check": check.describe(),
        }
    )


# --------------------------------------------------------------------------- loading


async def open_chosen(
    plan: Plan,
    *,
    open_candidate: Callable[[Candidate], Awaitable[T]],
    compiled_of: Callable[[T], Any],
    feeds: Callable[[T], tuple[Feed, Feed]],
    check: Check,
    directory: Path,
    parts: Mapping[str, str],
    name: str,
) -> tuple[T, Choice]:
    """Open the candidate to use, measuring the plan's candidates unless a cached choice
    or a lone candidate makes that needless. Returns what ``open_candidate`` gave for it.

    ``open_candidate`` converts if need be, compiles and proves the entry on its
    own probe (a ModelLoadError when it cannot); ``feeds(safe)`` builds the
    check's probe and the timed batch. Compiling and measuring run in worker
    threads.
    """
    if len(plan.candidates) == 1:
        why = plan.why or "set in the config"
        return await open_candidate(plan.safe), Choice(plan.safe, plan.mode, "fixed", why)
    key = await trio.to_thread.run_sync(cache_key, plan, check, parts)
    cached = await trio.to_thread.run_sync(read_choice, directory, key)
    if cached is not None and cached.chosen in plan.candidates:
        return await open_candidate(cached.chosen), cached
    safe = await open_candidate(plan.safe)
    probe = await trio.to_thread.run_sync(feeds, safe)
    bench = await trio.to_thread.run_sync(Bench, plan.safe, compiled_of(safe), probe, check)
    trials: list[Trial] = []
    for candidate in plan.candidates[1:]:
        try:
            opened = await open_candidate(candidate)
        except ModelLoadError as exc:
            log.info("%s: %s is not a candidate here: %s", name, candidate.label, exc)
            trials.append(Trial(candidate, False, error=str(exc)[:300]))
            continue
        trials.append(await trio.to_thread.run_sync(bench.trial, candidate, compiled_of(opened)))
        # Let it go: at most two compiled models at once. MiniLM's first load peaks
        # at 485 MiB RSS this way, 667 with every candidate held (266 once loaded).
        del opened
    every = (await trio.to_thread.run_sync(bench.safe_trial), *trials)
    winner, why = decide(plan, every)
    del bench
    chosen_opened = safe if winner == plan.safe else await open_candidate(winner)
    del safe
    device = "" if plan.facts is None else f"{plan.facts.device}: {plan.facts.name}"
    choice = Choice(
        winner, plan.mode, "measured", why, check.describe(), every, round(time.time()), device
    )
    log.info("%s: %s", name, choice.summary())
    try:
        await trio.to_thread.run_sync(write_choice, directory, key, choice)
    except OSError as exc:  # the choice still holds for this run; the next one measures again
        log.warning("%s: cannot keep the precision choice in %s: %s", name, directory, exc)
    return chosen_opened, choice
