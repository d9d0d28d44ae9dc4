"""OVMSRunner against a real KServe v2 server (kserve 0.21 serving a real OpenVINO model)
and, for the OVMS routes no stand-in serves, against FakeOVMS (see fake_ovms.py).

The server is started once per session in a child process (kserve_standin.py),
bound to 127.0.0.1, with a bounded wait for readiness. The model is Yahoo's
Open-NSFW classifier (ONNX in a wheel) compiled by OpenVINO; answers are
compared with the same model run here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from fake_backend import Reply
from fake_ovms import MODEL, FakeOVMS
from support import undeclared

from protocols import ErrorCode, Tensor
from protocols.config import Table
from protocols.errors import ConfigError
from runners.base import OutputSpec, TensorSpec
from runners.errors import BadInput, ModelLoadError, ModelNotFound
from runners.remote import tfserving
from runners.remote.config import EndpointConfig
from runners.remote.endpoint import Endpoint
from runners.remote.errors import BackendGarbage, BackendUnreachable
from runners.remote.ovms import OVMSConfig, OVMSRunner

HERE = Path(__file__).resolve().parent
SERVED = "nsfw"
READY_WAIT_S = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def kserve_server() -> Iterator[str]:
    """A kserve model server in a child process; its base URL once it says it is ready."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "kserve_standin.py"), str(port), SERVED],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + READY_WAIT_S
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                pytest.fail(f"kserve stand-in exited with {proc.returncode}: {err}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2, trust_env=False).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"kserve stand-in not ready after {READY_WAIT_S} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture(scope="session")
def kserve_url() -> Iterator[str]:
    with kserve_server() as url:
        yield url


@pytest.fixture(scope="session")
def local_model() -> Any:
    """The same model, compiled here: the reference answers."""
    import openvino as ov
    from kserve_standin import model_path

    core = ov.Core()
    return core.compile_model(core.read_model(model_path()), "CPU")


class Recording(httpx.AsyncBaseTransport):
    """An httpx transport that notes each request's method and path, then sends it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str]] = []
        self.sizes: dict[tuple[str, str], int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        self.sizes[(request.method, request.url.path)] = len(request.content)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def config(url: str, model: str = SERVED, **fields: Any) -> OVMSConfig:
    table = Table(
        {"name": "ovms-test", "base_url": url, "model": model, "retries": 0, **fields}, "backend"
    )
    result = OVMSConfig.from_table(table)
    table.done()
    return result


def image_batch(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-120, 130, size=(n, 224, 224, 3)).astype(np.float32)


# -- against the real KServe v2 server --------------------------------------------


@pytest.mark.slow
async def test_metadata_becomes_input_specs_and_answers_match_local(
    kserve_url: str, local_model: Any
) -> None:
    runner = OVMSRunner(config(kserve_url, served_name="nsfw-remote", task="image-classification"))
    await runner.load()
    try:
        assert runner.info.name == "nsfw-remote"
        assert runner.info.inputs == (
            TensorSpec("input_0", frozenset({"float32"}), (None, 224, 224, 3)),
        )
        assert runner.info.extra["api"] == "kserve"
        images = image_batch(2)
        outputs = await runner.infer({"input_0": Tensor.from_numpy(images)}, {})
        (name,) = outputs
        got = outputs[name]
        assert isinstance(got, Tensor) and got.dtype == "float32" and got.shape == (2, 2)
        assert [o.name for o in runner.info.outputs] == [name]  # from the server's metadata
        assert undeclared(runner.info, outputs) == []
        want = local_model(images)[local_model.outputs[0]]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
        assert np.allclose(got.numpy().sum(axis=1), 1.0, atol=1e-4)  # softmax scores
        status = runner.status()
        assert status["model_status"]["ready"] is True
        assert status["endpoint"]["breaker"] == "closed"
        assert await runner.model_ready() is True
        assert await runner.server_health() == {"live": True, "ready": True}
    finally:
        await runner.close()


@pytest.mark.slow
async def test_binary_extension_matches_json(kserve_url: str, local_model: Any) -> None:
    """The binary tensor extension both ways: the same numbers, a fraction of the bytes."""
    transport = Recording()
    runner = OVMSRunner(config(kserve_url, binary=True), transport=transport)
    await runner.load()
    try:
        images = image_batch(2, seed=3)
        outputs = await runner.infer({"input_0": Tensor.from_numpy(images)}, {})
        got = outputs["4195"]
        assert isinstance(got, Tensor) and got.shape == (2, 2)
        want = local_model(images)[local_model.outputs[0]]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
        (sent,) = [n for (m, p), n in transport.sizes.items() if p.endswith("/infer")]
        assert sent < images.nbytes + 1024  # raw float32, not JSON text
    finally:
        await runner.close()


@pytest.mark.slow
async def test_wrong_dtype_or_shape_is_refused_before_sending(kserve_url: str) -> None:
    transport = Recording()
    runner = OVMSRunner(config(kserve_url), transport=transport)
    await runner.load()
    try:
        sent = len(transport.seen)
        bad = [
            {"input_0": Tensor.from_numpy(image_batch(1).astype(np.float64))},
            {"input_0": Tensor.from_numpy(np.zeros((1, 224, 224, 4), np.float32))},
            {"input_0": Tensor.from_numpy(np.zeros((224, 224, 3), np.float32))},
            {"pixels": Tensor.from_numpy(image_batch(1))},
            {},
        ]
        for inputs in bad:
            with pytest.raises(BadInput) as caught:
                await runner.infer(inputs, {})
            assert caught.value.code is ErrorCode.BAD_REQUEST
        assert len(transport.seen) == sent  # nothing went out
    finally:
        await runner.close()


@pytest.mark.slow
async def test_unknown_model_is_model_not_found(kserve_url: str) -> None:
    runner = OVMSRunner(config(kserve_url, model="no-such-model"))
    with pytest.raises(ModelNotFound) as caught:
        await runner.load()
    assert caught.value.code is ErrorCode.MODEL_NOT_FOUND
    await runner.close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["instances", "inputs"])
async def test_tfserving_predict_on_kserve(kserve_url: str, local_model: Any, fmt: str) -> None:
    """kserve serves TF-Serving's ``:predict`` too (not its status or metadata routes)."""
    images = Tensor.from_numpy(image_batch(2, seed=1))
    build = tfserving.encode_rows if fmt == "instances" else tfserving.encode_columnar
    async with Endpoint(EndpointConfig("kserve", kserve_url, retries=0)) as endpoint:
        answer = await endpoint.call_json(
            "POST",
            tfserving.predict_path(SERVED),
            body=build({"input_0": images}),
            idempotent=True,
        )
    outputs = tfserving.decode_predict(answer, "kserve", outputs={"4195": "float32"})
    got = outputs["4195"]
    assert isinstance(got, Tensor) and got.shape == (2, 2)
    want = local_model(images.numpy())[local_model.outputs[0]]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


# -- against FakeOVMS: routes no stand-in serves -----------------------------------


async def test_tfserving_runner_status_metadata_and_predict_formats() -> None:
    with FakeOVMS() as ovms:
        runner = OVMSRunner(config(ovms.url, model=MODEL, api="tfserving"))
        await runner.load()
        try:
            assert runner.info.inputs == (TensorSpec("x", frozenset({"float32"}), (None, 3)),)
            assert runner.status()["model_status"]["versions"][-1]["state"] == "AVAILABLE"
            x = Tensor.from_numpy(np.array([[1, 2, 3], [4, 5, 6]], np.float32))
            want = [[4.0, 6.0, 8.0], [10.0, 12.0, 14.0]]  # 2x + 2 (latest: version 2)
            for params in ({}, {"format": "rows"}, {"format": "columnar"}):
                out = await runner.infer({"x": x}, params)
                y = out["y"]
                assert isinstance(y, Tensor) and y.dtype == "float32"
                assert y.numpy().tolist() == want
            # A caller's own JSON instances go as they are.
            out = await runner.infer({}, {"instances": "[[1, 1, 1]]"})
            assert isinstance(out["y"], Tensor) and out["y"].numpy().tolist() == [[4.0, 4.0, 4.0]]
            bodies = [s.json() for s in ovms.requests_to(f"/v1/models/{MODEL}:predict")]
            assert "inputs" in bodies[0] and "instances" in bodies[1]
            assert bodies[-1]["instances"] == [[1, 1, 1]]
            for bad in ('{"a": 1}', "[", "", "[" * 50_000):
                with pytest.raises(BadInput):
                    runner.check({}, {"instances": bad})
            with pytest.raises(BadInput, match="not both"):
                runner.check({"x": x}, {"instances": "[[1, 1, 1]]"})
            with pytest.raises(BadInput, match="format"):
                runner.check({"x": x}, {"format": "sideways"})
        finally:
            await runner.close()


async def test_version_pinning_uses_versioned_paths() -> None:
    with FakeOVMS() as ovms:
        for api in ("tfserving", "kserve"):
            runner = OVMSRunner(config(ovms.url, model=MODEL, api=api, version=1))
            await runner.load()
            try:
                x = Tensor.from_numpy(np.zeros((1, 3), np.float32))
                out = await runner.infer({"x": x}, {})
                assert isinstance(out["y"], Tensor) and out["y"].numpy().tolist() == [[1.0] * 3]
                assert runner.status()["version"] == "1"
                # Both APIs declare the server's outputs, as infer gives them.
                assert runner.info.outputs == (OutputSpec("y", "float32", (None, 3)),)
                assert undeclared(runner.info, out) == []
            finally:
                await runner.close()
        paths = {s.path for s in ovms.seen}
        assert f"/v1/models/{MODEL}/versions/1:predict" in paths
        assert f"/v1/models/{MODEL}/versions/1/metadata" in paths
        assert f"/v2/models/{MODEL}/versions/1/infer" in paths
        assert f"/v2/models/{MODEL}/versions/1/ready" in paths
        assert not any(p.endswith((":predict", "/infer")) and "/versions/" not in p for p in paths)


async def test_unknown_version_and_unavailable_model() -> None:
    with FakeOVMS() as ovms:
        for api in ("tfserving", "kserve"):
            runner = OVMSRunner(config(ovms.url, model=MODEL, api=api, version=7))
            with pytest.raises(ModelNotFound, match="not found"):
                await runner.load()
            await runner.close()
        runner = OVMSRunner(config(ovms.url, model="warming", api="tfserving"))
        with pytest.raises(ModelLoadError, match="1: LOADING"):
            await runner.load()
        await runner.close()


async def test_config_reload_and_status() -> None:
    with FakeOVMS() as ovms:
        runner = OVMSRunner(config(ovms.url, model=MODEL, api="tfserving"))
        await runner.load()
        try:
            reloaded = await runner.reload_config()
            again = await runner.reload_config()  # 200: nothing new to apply
            assert reloaded == again
            assert [s.state for s in reloaded[MODEL]] == ["AVAILABLE", "AVAILABLE"]
            assert [s.state for s in reloaded["warming"]] == ["LOADING"]
            current = await runner.config_status()
            assert current == reloaded
            assert ovms.reloads == 2
        finally:
            await runner.close()


async def test_garbage_answers_are_backend_garbage() -> None:
    path = f"/v2/models/{MODEL}/infer"
    y = {"name": "y", "datatype": "FP32", "shape": [1, 3]}
    answers = [
        {"outputs": [{**y, "data": [1.0, 2.0]}]},  # too few values
        {"outputs": [{**y, "datatype": "FP64", "data": [1.0, 2.0, 3.0]}]},  # not the metadata's
        {"outputs": []},  # missing output
        {"outputs": [{**y, "data": ["a", "b", "c"]}]},  # strings for numbers
    ]
    with FakeOVMS() as ovms:
        runner = OVMSRunner(config(ovms.url, model=MODEL))
        await runner.load()
        try:
            x = Tensor.from_numpy(np.zeros((1, 3), np.float32))
            for answer in answers:
                ovms.plan(path, Reply(200, answer))
                with pytest.raises(BackendGarbage) as caught:
                    await runner.infer({"x": x}, {})
                assert caught.value.code is ErrorCode.INTERNAL
            ovms.plan(path, Reply(200, b"{not json"))
            with pytest.raises(BackendGarbage):
                await runner.infer({"x": x}, {})
        finally:
            await runner.close()


async def test_garbage_metadata_fails_the_load() -> None:
    with FakeOVMS() as ovms:
        ovms.plan(f"/v2/models/{MODEL}", Reply(200, {"name": MODEL, "inputs": "x"}))
        runner = OVMSRunner(config(ovms.url, model=MODEL))
        with pytest.raises(ModelLoadError, match="'inputs' is not a list") as caught:
            await runner.load()
        assert isinstance(caught.value.__cause__, BackendGarbage)
        await runner.close()


@pytest.mark.slow
async def test_server_gone_is_unreachable_not_executed() -> None:
    """A server of its own (stopped mid-test), so the shared one stays up."""
    limits = {"connect_timeout_s": 2.0, "timeout_s": 5.0}
    with kserve_server() as url:
        runner = OVMSRunner(config(url, **limits))
        await runner.load()
    try:
        x = Tensor.from_numpy(image_batch(1))
        with trio.fail_after(10), pytest.raises(BackendUnreachable) as caught:
            await runner.infer({"input_0": x}, {})
        assert caught.value.code is ErrorCode.NOT_EXECUTED
    finally:
        await runner.close()
    # At load, a server that is not there is a load failure that says why.
    runner = OVMSRunner(config(url, **limits))
    with trio.fail_after(10), pytest.raises(ModelLoadError, match="cannot connect"):
        await runner.load()
    await runner.close()


def test_config_fields_are_validated_and_named() -> None:
    good = config("http://127.0.0.1:9", model="m", version="latest", api="tfserving")
    assert good.version is None and good.served_name == "m" and good.api == "tfserving"
    assert config("http://127.0.0.1:9", version=3).version_text == "3"
    for fields, why in (
        ({"api": "grpc"}, r"backend\.api"),
        ({"version": 0}, r"backend\.version"),
        ({"version": "newest"}, r"backend\.version"),
        ({"tfs_format": "wide"}, r"backend\.tfs_format"),
        ({"base_url": "ftp://x"}, r"backend\.base_url"),
    ):
        with pytest.raises(ConfigError, match=why):
            config("http://127.0.0.1:9", **fields)
    with pytest.raises(ConfigError, match="unknown field"):
        config("http://127.0.0.1:9", modle="typo")
