"""The torch all-MiniLM-L6-v2 runner: the same embeddings as the OpenVINO runner.

The OpenVINO runner (converted once per session by conftest's ``models_dir``)
is the reference; both must agree row by row, and refuse the same inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from test_runner_openvino import BAD_INPUTS, TEXTS, embed, tokens

from protocols.config import Table
from protocols.errors import ConfigError
from runners.errors import BadInput
from runners.openvino_embed import DIM, OpenVINOEmbedRunner
from runners.torch_device import TorchPlacement
from runners.torch_embed import TorchEmbedConfig, TorchEmbedRunner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def torch_embedder() -> TorchEmbedRunner:
    runner = TorchEmbedRunner()
    trio.run(runner.load)
    return runner


@pytest.fixture(scope="session")
def ov_embedder(models_dir: Path) -> OpenVINOEmbedRunner:
    runner = OpenVINOEmbedRunner(models_dir)
    trio.run(runner.load)
    return runner


async def test_matches_the_openvino_runner(
    torch_embedder: TorchEmbedRunner, ov_embedder: OpenVINOEmbedRunner
) -> None:
    got = await embed(torch_embedder, {"text": TEXTS})
    want = await embed(ov_embedder, {"text": TEXTS})
    assert got.shape == want.shape == (len(TEXTS), DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(got * want, axis=1)
    assert cosine.min() > 0.999, cosine


async def test_token_tensors_give_the_text_embedding(torch_embedder: TorchEmbedRunner) -> None:
    texts = TEXTS[:3]
    from_text = await embed(torch_embedder, {"text": texts})
    from_tokens = await embed(torch_embedder, tokens(texts, "int32"))
    np.testing.assert_allclose(from_tokens, from_text, atol=1e-5)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_refuses_what_the_openvino_runner_refuses(case: str) -> None:
    inputs, message = BAD_INPUTS[case]
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        TorchEmbedRunner().check(inputs, {})


def test_info_names_the_device_it_got(torch_embedder: TorchEmbedRunner) -> None:
    info = torch_embedder.info.describe()
    assert info["task"] == "embeddings" and info["runner"] == "torch" and info["dim"] == DIM
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert info["device"] == expected


def test_config_from_table() -> None:
    table = Table({"device": "cpu", "dtype": "fp32", "concurrency": 2}, "models[3]")
    config = TorchEmbedConfig.from_table(table)
    table.done()
    assert config == TorchEmbedConfig(TorchPlacement("cpu", "fp32"), 2)
    with pytest.raises(ConfigError, match=r"models\[3\]\.concurrency"):
        TorchEmbedConfig.from_table(Table({"concurrency": 0}, "models[3]"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
async def test_cuda_matches_the_openvino_runner(
    ov_embedder: OpenVINOEmbedRunner, dtype: str
) -> None:
    runner = TorchEmbedRunner(TorchEmbedConfig(TorchPlacement("cuda:0", dtype)))
    await runner.load()
    assert runner.info.device == "cuda:0" and runner.info.precision == dtype
    got = await embed(runner, {"text": TEXTS})
    want = await embed(ov_embedder, {"text": TEXTS})
    # fp16 keeps about 3 significant digits; the pooled, normalized vectors still agree.
    assert np.sum(got * want, axis=1).min() > (0.999 if dtype == "fp32" else 0.995)
    await runner.close()
