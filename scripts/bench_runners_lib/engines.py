"""Sections 1 to 3: OpenVINO vs torch eager per model and batch, dynamic batching, and
the OpenVINO precisions the auto choice considers, each pinned and timed."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from protocols import Tensor
from runners.base import Runner

from .common import Budget, Figures, Targets, alternated, ms, pct, texts

BATCHES = (1, 8, 32)
CALLERS = 32
SWEEP = (CALLERS, 8)  # max_batch values measured with batching on


class TorchMiniLM(Runner):
    """all-MiniLM-L6-v2 in torch eager: transformers AutoModel, mean pooling, L2 norm.

    Only for this benchmark: the same texts and tokenizer as the OpenVINO runner,
    computed by the original network under torch.inference_mode in a worker thread.
    """

    concurrency = 1

    def __init__(self) -> None:
        from runners import openvino_embed

        self.info = openvino_embed.OpenVINOEmbedRunner(Path(".")).info
        self._limiter = trio.CapacityLimiter(1)
        self._model: Any = None
        self._tokenizer: Any = None

    async def load(self) -> None:
        def open_model() -> tuple[Any, Any]:
            from transformers import AutoModel

            from runners import convert_minilm as recipe

            source = recipe.model_dir()
            model = AutoModel.from_pretrained(str(source)).eval()
            return model, recipe.load_tokenizer(source / recipe.TOKENIZER)

        self._model, self._tokenizer = await trio.to_thread.run_sync(
            open_model, limiter=self._limiter
        )

    def _embed(self, batch: list[str]) -> np.ndarray[Any, Any]:
        import torch

        enc = self._tokenizer.encode_batch(batch)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        types = torch.tensor([e.type_ids for e in enc], dtype=torch.int64)
        with torch.inference_mode():
            hidden = self._model(
                input_ids=ids, attention_mask=mask, token_type_ids=types
            ).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            out: np.ndarray[Any, Any] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return out

    async def infer(self, inputs: Any, params: Any) -> dict[str, Any]:
        batch = inputs["text"]
        emb = await trio.to_thread.run_sync(self._embed, batch, limiter=self._limiter)
        return {"embedding": Tensor.from_numpy(emb)}


def torch_threads() -> int:
    """Pin torch's intra-op threads to the CPU count (what OpenVINO's CPU plugin uses)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return int(torch.get_num_threads())


ENGINES = ("openvino", "openvino-f32", "torch")


def engine_pairs(data_dir: Path) -> list[tuple[str, dict[str, Callable[[], Runner]]]]:
    """(model, builders by engine) for each model compared: OpenVINO at its default
    (auto) precision, OpenVINO pinned to fp32/f32 (the default before auto), torch."""
    from runners.openvino_embed import EmbedConfig, OpenVINOEmbedRunner
    from runners.ov_classify import OVClassifyConfig, OVClassifyRunner
    from runners.ov_device import OVOptions
    from runners.torch_classify import TorchClassifyConfig, TorchClassifyRunner
    from runners.torch_device import TorchPlacement

    f32 = OVOptions(precision="fp32", inference_precision="f32")
    return [
        (
            "efficientnet-lite0",
            {
                "openvino": lambda: OVClassifyRunner(data_dir),
                "openvino-f32": lambda: OVClassifyRunner(data_dir, OVClassifyConfig(options=f32)),
                "torch": lambda: TorchClassifyRunner(
                    data_dir, TorchClassifyConfig(placement=TorchPlacement("cpu", "fp32"))
                ),
            },
        ),
        (
            "all-minilm-l6-v2",
            {
                "openvino": lambda: OpenVINOEmbedRunner(data_dir),
                "openvino-f32": lambda: OpenVINOEmbedRunner(
                    data_dir, EmbedConfig(precision="fp32", inference_precision="f32")
                ),
                "torch": TorchMiniLM,
            },
        ),
    ]


def engine_inputs(model: str, batch: int) -> dict[str, Any]:
    if model == "efficientnet-lite0":
        rng = np.random.default_rng(batch)
        pixels = rng.uniform(-1, 1, (batch, 3, 224, 224)).astype(np.float32)
        return {"pixel_values": Tensor.from_numpy(pixels)}
    return {"text": texts(batch, seed=batch)}


async def bench_engines(data_dir: Path, budget: Budget) -> Figures:
    """The engines of a model loaded at once and timed in alternating blocks."""
    threads = await trio.to_thread.run_sync(torch_threads)
    out: Figures = {"torch_threads": threads, "models": {}}
    for model, makers in engine_pairs(data_dir):
        rows: Figures = {}
        runners: dict[str, Runner] = {}
        for engine, make in makers.items():
            runner = runners[engine] = make()
            t = time.perf_counter()
            await runner.load()
            converted = getattr(runner, "conversion_s", None) is not None
            load_s = round(time.perf_counter() - t, 2)
            rows[engine] = {"load_s": load_s, "converted": converted, "batches": {}}
            state = runner.status() or {}
            if "precision" in state:  # the OpenVINO runners' auto choice, with its figures
                rows[engine]["precision"] = state["precision"]
        for batch in BATCHES:
            inputs = engine_inputs(model, batch)
            calls = {engine: _caller(runner, inputs) for engine, runner in runners.items()}
            for engine, times in (await alternated(calls, budget)).items():
                median = statistics.median(times)
                rows[engine]["batches"][batch] = {
                    "median_ms": ms(median),
                    "p90_ms": ms(pct(times, 0.9)),
                    # From the median: robust to other work on a shared machine.
                    "rows_per_s": batch / median,
                    "rows_per_s_mean": batch * len(times) / sum(times),
                    "calls": len(times),
                }
        for runner in runners.values():
            await runner.close()
        out["models"][model] = rows
    return out


def _caller(runner: Runner, inputs: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    async def call() -> None:
        await runner.infer(inputs, {})

    return call


def report_engines(r: Figures, targets: Targets) -> None:
    print("1. OpenVINO vs torch eager on CPU, one caller, engines timed in alternating blocks")
    print(f"   (torch.set_num_threads({r['torch_threads']}); openvino: the runners' defaults,")
    print("   auto precision, LATENCY hint, one request over all cores; openvino-f32: the")
    print("   same pinned to fp32/f32; rows/s = batch / median latency; MiniLM's timings")
    print("   include tokenizing, the same tokenizer for all)")
    head = f"  {'model':<20}{'batch':>6} {'engine':<13}{'median':>10}{'p90':>10}{'rows/s':>10}"
    print(head + f"{'x torch':>10}")
    for model, rows in r["models"].items():
        for batch in BATCHES:
            pt = rows["torch"]["batches"][batch]
            ratio = rows["openvino"]["batches"][batch]["rows_per_s"] / pt["rows_per_s"]
            for engine in ENGINES:
                f = rows[engine]["batches"][batch]
                x = f["rows_per_s"] / pt["rows_per_s"]
                extra = f"{x:9.2f}x" if engine != "torch" else ""
                print(
                    f"  {model:<20}{batch:>6} {engine:<13}{f['median_ms']:>8.1f}ms"
                    f"{f['p90_ms']:>8.1f}ms{f['rows_per_s']:>10.1f}{extra}"
                )
            if batch == 8:
                figure = f"{model}: OpenVINO/torch rows/s, batch 8"
                targets.append((figure, f"{ratio:.2f}x", ">= 2x", ratio >= 2))
                r["models"][model]["ratio_batch8"] = ratio
        loads = ", ".join(
            f"{e} {rows[e]['load_s']} s{' (converted)' if rows[e]['converted'] else ''}"
            for e in ENGINES
        )
        print(f"  {model} load: {loads}")
        chosen = rows["openvino"].get("precision")
        if chosen:
            print(f"  {model} OpenVINO precision: {chosen['chosen']} ({chosen['mode']}, ")
            print(f"    {chosen['source']}): {chosen['why']}")
    print()


# --------------------------------------------------------------------------- 2. batching


async def hammer(runner: Runner, seconds: float) -> Figures:
    """CALLERS tasks sending one text each in a loop for ``seconds``."""
    latencies: list[float] = []
    pool = texts(256, seed=7)

    async def caller(k: int, deadline: float) -> None:
        i = k
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            await runner.infer({"text": pool[i % len(pool)]}, {})
            latencies.append(time.perf_counter() - t)
            i += CALLERS

    async with trio.open_nursery() as nursery:  # warm-up
        for k in range(CALLERS):
            nursery.start_soon(caller, k, time.perf_counter() + 0.3)
    latencies.clear()
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(CALLERS):
            nursery.start_soon(caller, k, start + seconds)
    took = time.perf_counter() - start
    return {
        "req_per_s": len(latencies) / took,
        "median_ms": ms(statistics.median(latencies)),
        "p99_ms": ms(pct(latencies, 0.99)),
        "requests": len(latencies),
    }


async def bench_batching(data_dir: Path, budget: Budget, wait_ms: float) -> Figures:
    from runners.batching import BatchConfig, BatchingRunner
    from runners.openvino_embed import OpenVINOEmbedRunner

    seconds = max(1.0, 2 * budget.seconds)
    bare = OpenVINOEmbedRunner(data_dir)
    await bare.load()
    cases: Figures = {"off": await hammer(bare, seconds)}
    for max_batch in SWEEP:
        batched = BatchingRunner(bare, BatchConfig(max_batch=max_batch, max_wait_ms=wait_ms))
        on = await hammer(batched, seconds)
        on["mean_batch"] = batched.rows / max(1, batched.calls)
        cases[f"on, max_batch={max_batch}"] = on
    await bare.close()
    off = cases["off"]["req_per_s"]
    for f in cases.values():
        f["ratio"] = f["req_per_s"] / off
    return {
        "seconds": seconds,
        "inner_concurrency": bare.concurrency,
        "max_wait_ms": wait_ms,
        "cases": cases,
        "ratio": cases[f"on, max_batch={CALLERS}"]["ratio"],
    }


def report_batching(r: Figures, targets: Targets) -> None:
    print(
        f"2. Dynamic batching, all-minilm-l6-v2 on OpenVINO, {CALLERS} callers x one text, "
        f"{r['seconds']:.0f} s each"
    )
    print(
        f"   (inner runner concurrency {r['inner_concurrency']}; BatchConfig max_wait_ms="
        f"{r['max_wait_ms']}; the target is for max_batch={CALLERS})"
    )
    print(
        f"  {'batching':<20}{'req/s':>10}{'median':>10}{'p99':>10}{'mean batch':>12}{'vs off':>8}"
    )
    for name, f in r["cases"].items():
        batch = f"{f['mean_batch']:.1f}" if "mean_batch" in f else "1"
        print(
            f"  {name:<20}{f['req_per_s']:>10.1f}{f['median_ms']:>8.1f}ms"
            f"{f['p99_ms']:>8.1f}ms{batch:>12}{f['ratio']:>7.2f}x"
        )
    ratio = r["ratio"]
    figure = f"MiniLM req/s, batching on / off, {CALLERS} callers"
    targets.append((figure, f"{ratio:.2f}x", ">= 2x", ratio >= 2))
    print()


# --------------------------------------------------------------------------- precision


def precision_models(data_dir: Path) -> list[tuple[str, Callable[[Any], Runner]]]:
    """(model, build(candidate or None for auto)) for each model with an auto precision."""
    from runners.openvino_embed import EmbedConfig, OpenVINOEmbedRunner
    from runners.ov_classify import OVClassifyConfig, OVClassifyRunner
    from runners.ov_device import OVOptions

    def embed(c: Any) -> Runner:
        if c is None:
            return OpenVINOEmbedRunner(data_dir)
        config = EmbedConfig(precision=c.weights, inference_precision=c.inference)
        return OpenVINOEmbedRunner(data_dir, config)

    def classify(c: Any) -> Runner:
        if c is None:
            return OVClassifyRunner(data_dir)
        options = OVOptions(precision=c.weights, inference_precision=c.inference)
        return OVClassifyRunner(data_dir, OVClassifyConfig(options=options))

    return [("all-minilm-l6-v2", embed), ("efficientnet-lite0", classify)]


async def bench_precision(data_dir: Path, budget: Budget) -> Figures:
    """Per model, what the auto precision chose here (with the figures it measured at
    load), then every candidate it considered, pinned, timed in alternating blocks;
    for MiniLM also each candidate's cosine to fp32/f32 over 32 texts."""
    from runners.ov_choice import Candidate

    out: Figures = {"models": {}}
    for model, build in precision_models(data_dir):
        auto = build(None)
        started = time.perf_counter()
        await auto.load()
        load_s = round(time.perf_counter() - started, 2)
        choice = (auto.status() or {})["precision"]
        await auto.close()
        labels = [t["candidate"] for t in choice.get("candidates", ())] or [choice["chosen"]]
        runners = {label: build(Candidate.parse(label)) for label in labels}
        for runner in runners.values():
            await runner.load()
        figures: Figures = {"auto": choice, "auto_load_s": load_s, "batches": {}}
        if model == "all-minilm-l6-v2":
            probe = {"text": texts(32, seed=99)}
            vectors = {}
            for label, runner in runners.items():
                embedding = (await runner.infer(probe, {}))["embedding"]
                assert isinstance(embedding, Tensor)
                vectors[label] = embedding.numpy()
            reference = vectors[labels[0]]
            figures["cosine_min"] = {
                label: float(np.min(np.sum(v * reference, axis=1))) for label, v in vectors.items()
            }
        for batch in BATCHES:
            inputs = engine_inputs(model, batch)
            calls = {label: _caller(runner, inputs) for label, runner in runners.items()}
            figures["batches"][batch] = {
                label: {
                    "median_ms": ms(statistics.median(t)),
                    "rows_per_s": batch / statistics.median(t),
                }
                for label, t in (await alternated(calls, budget)).items()
            }
        for runner in runners.values():
            await runner.close()
        out["models"][model] = figures
    return out


def report_precision(r: Figures) -> None:
    print("3. OpenVINO precisions: what auto chose, and every candidate it tried, pinned")
    print("   (weights/arithmetic; rows/s from the median of alternating blocks; x = vs the")
    print("   first, fp32/f32)")
    for model, f in r["models"].items():
        choice = f["auto"]
        took = f"{choice['source']}, load {f['auto_load_s']} s"
        print(f"  {model}: auto chose {choice['chosen']} ({took})")
        print(f"    {choice['why']}; check: {choice.get('check', '-')}")
        for trial in choice.get("candidates", ()):
            shown = {k: v for k, v in trial.items() if k not in ("candidate", "passed")}
            verdict = "passed" if trial["passed"] else "FAILED"
            print(f"    at load: {trial['candidate']:<10} {verdict:<7} {shown}")
        labels = list(next(iter(f["batches"].values())))
        print(f"  {'batch':>8}" + "".join(f"{label:>16}" for label in labels))
        for batch, row in f["batches"].items():
            base = row[labels[0]]["rows_per_s"]
            cells = [
                f"{row[label]['rows_per_s']:8.1f} {row[label]['rows_per_s'] / base:5.2f}x"
                for label in labels
            ]
            print(f"  {batch:>8}" + "".join(f"{cell:>16}" for cell in cells))
        if "cosine_min" in f:
            cosines = ", ".join(f"{k} {v:.5f}" for k, v in f["cosine_min"].items())
            print(f"    cosine min to {labels[0]} over 32 texts: {cosines}")
    print()
