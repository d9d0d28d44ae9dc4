"""EfficientNet-Lite0 classification: the OpenVINO runner, its torch twin, and what they share.

The real model converts once per session and precision into a shared models
dir (a child process: fp32 ~15 s, int8 ~8 s). The test image is scikit-learn's
``flower.jpg``, a daisy (ImageNet class 985). torch eager on CPU is the
reference for OpenVINO's logits; CUDA tests run only where torch sees a GPU.
The runners compared with torch are pinned to f32 arithmetic; the default
(auto, measured) precision has tests of its own here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trio
from sklearn.datasets import load_sample_image
from support import undeclared

from protocols import Tensor, Value
from protocols.config import Table
from protocols.errors import ConfigError
from runners import imagenet, ir_cache, ov_choice
from runners.errors import BadInput, ModelLoadError
from runners.ov_classify import OVClassifyConfig, OVClassifyRunner
from runners.torch_classify import TorchClassifyConfig, TorchClassifyRunner
from runners.torch_device import TorchPlacement, resolve

DAISY = 985
NO_CUDA = "no CUDA GPU on this machine (torch.cuda.is_available() is False)"


@pytest.fixture(scope="session")
def classify_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classify-models")


@pytest.fixture(scope="session")
def flower() -> np.ndarray:
    return np.ascontiguousarray(load_sample_image("flower.jpg")[None])  # [1, 427, 640, 3]


@pytest.fixture(scope="session")
def china() -> np.ndarray:
    return np.ascontiguousarray(load_sample_image("china.jpg")[None])


def ov_runner(models: Path, **fields: Any) -> OVClassifyRunner:
    return OVClassifyRunner(models, OVClassifyConfig.from_table(Table(fields, "models[0]")))


@pytest.fixture(scope="session")
def ov_fp32(classify_models: Path) -> OVClassifyRunner:
    runner = ov_runner(classify_models, precision="fp32", inference_precision="f32")
    trio.run(runner.load)
    return runner


@pytest.fixture(scope="session")
def ov_int8(classify_models: Path) -> OVClassifyRunner:
    runner = ov_runner(classify_models, precision="int8", inference_precision="f32")
    trio.run(runner.load)
    return runner


@pytest.fixture(scope="session")
def ov_auto(ov_fp32: OVClassifyRunner, ov_int8: OVClassifyRunner) -> OVClassifyRunner:
    """The default: precision measured on this machine (both IRs are converted by now)."""
    runner = ov_runner(ov_fp32.model_dir.parent)
    trio.run(runner.load)
    return runner


@pytest.fixture(scope="session")
def torch_cpu(classify_models: Path) -> TorchClassifyRunner:
    config = TorchClassifyConfig(placement=TorchPlacement("cpu", "fp32"))
    runner = TorchClassifyRunner(classify_models, config)
    trio.run(runner.load)
    return runner


async def classify(runner: Any, inputs: Mapping[str, Value], **params: Any) -> dict[str, Any]:
    out = await runner.infer(inputs, params)
    return {k: v.numpy() if isinstance(v, Tensor) else v for k, v in out.items()}


def image(array: np.ndarray) -> dict[str, Value]:
    return {"image": Tensor.from_numpy(np.ascontiguousarray(array))}


@pytest.mark.slow
async def test_flower_is_a_daisy_on_openvino(ov_fp32: OVClassifyRunner, flower: np.ndarray) -> None:
    out = await classify(ov_fp32, image(flower), top_k=3)
    assert set(out) == {"indices", "scores", "labels"}
    assert out["indices"].dtype == np.int64 and out["indices"].shape == (1, 3)
    assert out["scores"].dtype == np.float32 and out["scores"].shape == (1, 3)
    assert out["indices"][0, 0] == DAISY
    assert out["labels"][0] == "daisy" and len(out["labels"]) == 3
    assert np.all(np.diff(out["scores"][0]) <= 0) and out["scores"].sum() <= 1.0
    info = ov_fp32.info.describe()
    assert (info["task"], info["runner"], info["precision"]) == (
        "image-classification",
        "openvino",
        "fp32",
    )
    assert info["inference_precision"] == "f32"
    status = ov_fp32.status()
    assert status is not None and status["precision"]["mode"] == "pinned"
    assert status["precision"]["chosen"] == "fp32/f32"


@pytest.mark.slow
async def test_auto_precision_passed_its_check_and_keeps_the_daisy(
    ov_auto: OVClassifyRunner, ov_fp32: OVClassifyRunner, flower: np.ndarray, china: np.ndarray
) -> None:
    status = ov_auto.status()
    assert status is not None
    precision = status["precision"]
    assert (precision["mode"], precision["source"]) == ("auto", "measured")
    assert precision["check"] == "top-1 equal and top-5 overlap >= 4/5 per probe"
    trials = {t["candidate"]: t for t in precision["candidates"]}
    cpu = ov_choice.device_facts("CPU")
    assert cpu is not None
    want = [c.label for c in ov_choice.plan("auto", "auto", cpu, "CPU").candidates]
    assert list(trials) == want
    for trial in trials.values():  # the recorded figures agree with the verdicts
        meets = trial["top1_equal"] == trial["probes"] == 8 and trial["top5_min"] >= 4
        assert trial["passed"] == meets, trial
    chosen = trials[precision["chosen"]]
    assert chosen["passed"] and chosen["rows_per_s"] > 0
    assert (ov_auto.info.precision, ov_auto.info.extra["inference_precision"]) == (
        precision["weights"],
        precision["inference"],
    )
    assert ov_auto.cache_root == ov_auto.model_dir / precision["weights"]
    # A real photograph the probe never saw: same top-1, most of the same top-5.
    both = np.concatenate([flower[:, :400, :600], china[:, :400, :600]])
    auto = await classify(ov_auto, image(both), top_k=5)
    full = await classify(ov_fp32, image(both), top_k=5)
    assert auto["labels"][0] == "daisy"
    np.testing.assert_array_equal(auto["indices"][:, 0], full["indices"][:, 0])
    for got, want_row in zip(auto["indices"], full["indices"], strict=True):
        assert len(set(got) & set(want_row)) >= 4


@pytest.mark.slow
async def test_auto_precision_is_measured_once(
    ov_auto: OVClassifyRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured again")

    monkeypatch.setattr(ov_choice, "Bench", refuse)
    again = ov_runner(ov_auto.model_dir.parent)
    await again.load()
    status, first = again.status(), ov_auto.status()
    assert status is not None and first is not None
    assert status["precision"] == {**first["precision"], "source": "cache"}
    assert again.conversion_s is None and again.info == ov_auto.info


@pytest.mark.slow
async def test_auto_precision_falls_back_to_fp32_when_nothing_passes(
    ov_auto: OVClassifyRunner, tmp_path: Path
) -> None:
    """Logits at cosine 1.0 to fp32/f32: no reduced precision gives that."""
    copy = tmp_path / "models"
    shutil.copytree(ov_auto.model_dir, copy / ov_auto.model_dir.name, copy_function=os.link)
    runner = ov_runner(copy, auto_min_cosine=1.0)
    await runner.load()
    status = runner.status()
    assert status is not None
    precision = status["precision"]
    assert (precision["chosen"], precision["source"]) == ("fp32/f32", "measured")
    others = [t for t in precision["candidates"] if t["candidate"] != "fp32/f32"]
    assert others and all(not t["passed"] and t["cosine_min"] < 1.0 for t in others)
    assert runner.info.extra["inference_precision"] == "f32"


@pytest.mark.slow
async def test_openvino_logits_match_torch(
    ov_fp32: OVClassifyRunner, torch_cpu: TorchClassifyRunner, flower: np.ndarray, china: np.ndarray
) -> None:
    both = np.concatenate([flower[:, :400, :600], china[:, :400, :600]])
    ov_out = await classify(ov_fp32, image(both), top_k=5, logits=True)
    torch_out = await classify(torch_cpu, image(both), top_k=5, logits=True)
    assert ov_out["logits"].shape == (2, 1000)
    np.testing.assert_allclose(ov_out["logits"], torch_out["logits"], atol=1e-3)
    np.testing.assert_array_equal(ov_out["indices"], torch_out["indices"])
    assert torch_out["labels"][0] == "daisy"
    # Preprocessed pixels give the same answer as the image they came from.
    pixels = {"pixel_values": Tensor.from_numpy(imagenet.preprocess(both))}
    np.testing.assert_allclose(
        (await classify(ov_fp32, pixels, logits=True))["logits"], ov_out["logits"], atol=1e-5
    )


@pytest.mark.slow
async def test_rows_of_a_batch_are_independent(
    ov_fp32: OVClassifyRunner, flower: np.ndarray
) -> None:
    alone = await classify(ov_fp32, image(flower), logits=True)
    rng = np.random.default_rng(5)
    noise = rng.integers(0, 256, size=flower.shape, dtype=np.uint8)
    mixed = await classify(ov_fp32, image(np.concatenate([noise, flower])), logits=True, top_k=2)
    np.testing.assert_allclose(mixed["logits"][1], alone["logits"][0], atol=1e-4)
    assert len(mixed["labels"]) == 4 and mixed["labels"][2] == "daisy"  # row by row


@pytest.mark.slow
async def test_int8_weights_keep_the_daisy(
    ov_int8: OVClassifyRunner, ov_fp32: OVClassifyRunner, flower: np.ndarray
) -> None:
    q = await classify(ov_int8, image(flower), top_k=1)
    full = await classify(ov_fp32, image(flower), top_k=1)
    assert q["indices"][0, 0] == full["indices"][0, 0] == DAISY
    assert abs(float(q["scores"][0, 0]) - float(full["scores"][0, 0])) < 0.1
    assert ov_int8.info.precision == "int8"
    fp32_bin = next((ov_fp32.cache_root).glob("ir-*/model.bin")).stat().st_size
    int8_bin = next((ov_int8.cache_root).glob("ir-*/model.bin")).stat().st_size
    assert int8_bin < fp32_bin / 3  # the weights really are 8-bit


@pytest.mark.slow
async def test_each_precision_keeps_its_own_cache_entry(
    ov_int8: OVClassifyRunner, ov_fp32: OVClassifyRunner, classify_models: Path
) -> None:
    for runner in (ov_fp32, ov_int8):
        assert len(list(runner.cache_root.glob(f"{ir_cache.ENTRY_PREFIX}*"))) == 1
    again = ov_runner(classify_models, precision="int8")
    await again.load()
    assert again.conversion_s is None  # the int8 entry survived the fp32 one and vice versa


@pytest.mark.slow
async def test_a_damaged_entry_is_converted_again(
    ov_fp32: OVClassifyRunner, tmp_path: Path, flower: np.ndarray
) -> None:
    copy = tmp_path / "models"
    shutil.copytree(ov_fp32.cache_root.parent, copy / ov_fp32.cache_root.parent.name)
    runner = ov_runner(copy, precision="fp32", inference_precision="f32")
    (entry,) = runner.cache_root.glob(f"{ir_cache.ENTRY_PREFIX}*")
    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    half = len(data) // 2
    data[half:] = np.random.default_rng(0).bytes(len(data) - half)  # same size: manifest agrees
    weights.write_bytes(bytes(data))
    await runner.load()
    assert runner.conversion_s is not None
    assert (await classify(runner, image(flower), top_k=1))["indices"][0, 0] == DAISY


@pytest.mark.slow
async def test_bad_inputs_and_params_are_refused(
    ov_fp32: OVClassifyRunner, flower: np.ndarray
) -> None:
    pixels = np.zeros((1, 3, 224, 224), np.float32)
    nan = pixels.copy()
    nan[0, 0, 0, 0] = np.nan
    cases: list[tuple[dict[str, Value], dict[str, Any], str]] = [
        ({}, {}, "exactly one"),
        ({**image(flower), "pixel_values": Tensor.from_numpy(pixels)}, {}, "exactly one"),
        (image(flower[:, :20, :20]), {}, "sides must be"),
        (image(flower[:, :, :, :2]), {}, "shape"),
        ({"image": Tensor.from_numpy(flower.astype(np.float32))}, {}, "dtype"),
        ({"pixel_values": Tensor.from_numpy(nan)}, {}, "NaN"),
        ({"pixel_values": Tensor.from_numpy(np.zeros((65, 3, 224, 224), np.float32))}, {}, "65"),
        (image(flower), {"top_k": 0}, "top_k"),
        (image(flower), {"top_k": 1001}, "top_k"),
        (image(flower), {"top_k": True}, "top_k"),
        (image(flower), {"top_k": "3"}, "top_k"),
        (image(flower), {"logits": 1}, "logits"),
        (image(flower), {"temperature": 1.0}, "unknown params"),
    ]
    for inputs, params, message in cases:
        with pytest.raises(BadInput, match=message):
            ov_fp32.check(inputs, params)
        with pytest.raises(BadInput, match=message):
            await ov_fp32.infer(inputs, params)
    every = await classify(ov_fp32, image(flower), top_k=1000)
    assert sorted(every["indices"][0].tolist()) == list(range(1000))
    assert abs(float(every["scores"].sum()) - 1.0) < 1e-4


def test_preprocessing_matches_torch_antialiased_resize(flower: np.ndarray) -> None:
    for crop in (flower, flower[:, :90, :130]):  # shrinking and enlarging
        got = imagenet.preprocess(crop)
        _, h, w, _ = crop.shape
        side = int(imagenet.CROP_FRACTION * min(h, w))
        top, left = (h - side) // 2, (w - side) // 2
        square = np.array(crop[:, top : top + side, left : left + side])
        t = torch.from_numpy(square).permute(0, 3, 1, 2).float()
        want = torch.nn.functional.interpolate(
            t, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
        )
        np.testing.assert_allclose(got, ((want - 127) / 128).numpy(), atol=1e-4)
        assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32


def test_answers_are_the_declared_outputs() -> None:
    """Both classifiers answer through imagenet.answer and declare imagenet.OUTPUTS."""
    info = TorchClassifyRunner(
        Path("unused"), TorchClassifyConfig(placement=TorchPlacement("cpu", "fp32"))
    ).info
    assert info.outputs == imagenet.OUTPUTS == OVClassifyRunner(Path("unused")).info.outputs
    logits = np.random.default_rng(0).normal(size=(2, imagenet.CLASSES)).astype(np.float32)
    for want_logits in (False, True):
        assert undeclared(info, imagenet.answer(logits, 3, want_logits)) == []


def test_labels_are_imagenet_1k_in_class_order() -> None:
    names = imagenet.labels()
    assert len(names) == 1000
    assert names[0].startswith("tench") and names[DAISY] == "daisy"
    assert names[999].startswith("toilet tissue")


def test_configs_name_the_bad_field() -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.precision"):
        OVClassifyConfig.from_table(Table({"precision": "int2"}, "models[0]"))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) top_k"):
        OVClassifyConfig.from_table(Table({"top_k": 3}, "models[0]"))
    # The torch classifier reads device and dtype as every torch runner does (torch_device).
    with pytest.raises(ConfigError, match=r"models\[1\]\.dtype: fp16 is refused on the CPU"):
        TorchClassifyConfig.from_table(Table({"device": "cpu", "dtype": "fp16"}, "models[1]"))
    with pytest.raises(ConfigError, match=r"models\[1\]\.device: expected auto, cpu, cuda"):
        TorchClassifyConfig.from_table(Table({"device": "gpu"}, "models[1]"))
    with pytest.raises(ConfigError, match=r"models\[1\]\.dtype"):
        TorchClassifyConfig.from_table(Table({"dtype": "int8"}, "models[1]"))
    with pytest.raises(ConfigError, match=r"models\[1\]\.concurrency"):
        TorchClassifyConfig.from_table(Table({"concurrency": 17}, "models[1]"))
    parsed = TorchClassifyConfig.from_table(Table({"device": "CUDA:1", "dtype": "bf16"}, "m"))
    assert parsed.placement == TorchPlacement("cuda:1", "bf16")
    default = TorchClassifyConfig.from_table(Table({}, "m"))
    assert default.placement == TorchPlacement("auto", "fp32")  # fp32 unless asked, as before
    assert default == TorchClassifyConfig()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
async def test_torch_device_resolution_without_a_gpu(tmp_path: Path) -> None:
    assert resolve(TorchPlacement("auto", "fp32")).device_name == "cpu"
    assert resolve(TorchPlacement("auto", "auto")).precision == "fp32"
    for placement, message in (
        (TorchPlacement("cuda:1", "fp32"), "device cuda:1 asked for, but torch sees no CUDA GPU"),
        (TorchPlacement("auto", "fp16"), "dtype fp16 is refused on the CPU"),
    ):
        runner = TorchClassifyRunner(tmp_path, TorchClassifyConfig(placement=placement))
        with pytest.raises(ModelLoadError, match=message):
            await runner.load()
        assert runner.info.device == placement.device  # still what was asked: not loaded
        await runner.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
async def test_torch_on_cuda_matches_cpu(
    dtype: str, torch_cpu: TorchClassifyRunner, flower: np.ndarray, tmp_path: Path
) -> None:
    config = TorchClassifyConfig(placement=TorchPlacement("cuda", dtype))
    runner = TorchClassifyRunner(tmp_path, config)
    await runner.load()
    assert runner.info.device == "cuda:0" and runner.info.precision == dtype
    both = np.concatenate([flower, flower[:, ::-1]])
    got = await classify(runner, image(both), logits=True, top_k=1)
    want = await classify(torch_cpu, image(both), logits=True, top_k=1)
    assert got["logits"].dtype == np.float32
    tolerance = {"fp32": 1e-2, "fp16": 0.1, "bf16": 0.5}[dtype]
    np.testing.assert_allclose(got["logits"], want["logits"], atol=tolerance)
    assert got["indices"][0, 0] == DAISY
    # close gives the network's memory back to the device, not only to torch's cache.
    assert runner._session is not None
    weights = sum(p.numel() * p.element_size() for p in runner._session.model.parameters())
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    await runner.close()
    assert torch.cuda.memory_allocated() <= allocated - weights
    assert torch.cuda.memory_reserved() < reserved


@pytest.mark.slow
async def test_auto_device_and_throughput_hint(
    ov_fp32: OVClassifyRunner, classify_models: Path, flower: np.ndarray
) -> None:
    runner = ov_runner(classify_models, device="auto", performance_hint="THROUGHPUT")
    await runner.load()
    assert runner.conversion_s is None  # the same fp32 entry: device and hint are not in the key
    assert runner.info.device == "CPU"  # AUTO resolved to what is here
    assert runner._queue is not None and runner.concurrency == runner._queue.jobs
    batch = np.concatenate([flower, flower])
    results: list[np.ndarray] = []

    async def one() -> None:
        results.append((await classify(runner, image(batch), top_k=1))["indices"])

    async with trio.open_nursery() as nursery:
        for _ in range(2 * runner.concurrency):
            nursery.start_soon(one)
    assert all((r == DAISY).all() for r in results) and len(results) == 2 * runner.concurrency
