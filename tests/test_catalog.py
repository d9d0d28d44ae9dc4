"""Model specs: what parses, what each builds, and what an unknown spec is told."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from protocols import ErrorCode, SwarmError
from runners.catalog import (
    DEFAULT_MODEL,
    ModelSpec,
    ModelSpecError,
    build_runner,
    parse_model_spec,
)
from runners.fake import FakeRunner
from runners.openvino_embed import OpenVINOEmbedRunner


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("all-minilm-l6-v2", ModelSpec("openvino-embed", "all-minilm-l6-v2")),
        ("all-MiniLM-L6-v2", ModelSpec("openvino-embed", "all-minilm-l6-v2")),
        ("  ALL-MINILM-L6-V2 ", ModelSpec("openvino-embed", "all-minilm-l6-v2")),
        ("fake:echo", ModelSpec("fake", "echo")),
        ("FAKE:Echo_1.b-2", ModelSpec("fake", "Echo_1.b-2")),
        ("fake:slow:250", ModelSpec("fake", "slow", 250.0)),
        ("fake:slow:0.5", ModelSpec("fake", "slow", 0.5)),
        ("fake:slow:0", ModelSpec("fake", "slow", 0.0)),
    ],
)
def test_specs_parse(text: str, spec: ModelSpec) -> None:
    assert parse_model_spec(text) == spec
    assert parse_model_spec(str(spec)) == spec  # str() is canonical and parses back


def test_default_model_is_the_embedded_minilm() -> None:
    assert parse_model_spec(DEFAULT_MODEL) == ModelSpec("openvino-embed", "all-minilm-l6-v2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpt-4", "unknown model 'gpt-4'; available: all-minilm-l6-v2"),
        ("", "unknown model"),
        ("fake", "unknown model"),
        ("fake:", "unknown model"),
        ("openvino:all-minilm-l6-v2", "unknown model"),
        ("fake:has space", "fake model name"),
        ("fake:-lead", "fake model name"),
        ("fake:" + "n" * 129, "fake model name"),
        ("fake:x:-1", "latency '-1'"),
        ("fake:x:abc", "latency 'abc'"),
        ("fake:x:nan", "latency 'nan'"),
        ("fake:x:inf", "latency 'inf'"),
        ("fake:x:1:2", "latency '1:2'"),
    ],
)
def test_bad_specs_are_typed_errors(text: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message) as raised:
        parse_model_spec(text)
    assert isinstance(raised.value, SwarmError)
    assert raised.value.code is ErrorCode.BAD_REQUEST


def test_unknown_spec_lists_what_is_available() -> None:
    with pytest.raises(ModelSpecError) as raised:
        parse_model_spec("resnet50")
    assert "all-minilm-l6-v2" in str(raised.value) and "fake:NAME" in str(raised.value)


async def test_fake_spec_builds_a_fake_with_its_latency(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    runner = build_runner("fake:slow:250", tmp_path)
    assert isinstance(runner, FakeRunner)
    assert runner.info.name == "slow"
    start = trio.current_time()
    out = await runner.infer({"text": "hi"}, {"chunks": 1})
    assert trio.current_time() - start == pytest.approx(0.25)
    assert out["text"]


def test_default_spec_builds_the_openvino_runner_without_loading(tmp_path: Path) -> None:
    runner = build_runner(parse_model_spec("all-MiniLM-L6-v2"), tmp_path)
    assert isinstance(runner, OpenVINOEmbedRunner)
    assert runner.info.name == "all-minilm-l6-v2" and runner.info.runner == "openvino"
    assert runner.cache_root == tmp_path / "all-minilm-l6-v2"
    assert not runner.loaded and list(tmp_path.iterdir()) == []  # nothing converted yet
