"""Model specs: what parses, what each builds, and what an unknown spec is told."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import trio
import trio.testing

from protocols import ErrorCode, SwarmError
from runners.batching import BatchingRunner
from runners.catalog import (
    DEFAULT_MODEL,
    ModelSpecError,
    build_runner,
    parse_model_spec,
    specs_from_config,
)
from runners.fake import FakeRunner
from runners.openvino_embed import OpenVINOEmbedRunner


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("all-minilm-l6-v2", "openvino-embed", "all-minilm-l6-v2"),
        ("all-MiniLM-L6-v2", "openvino-embed", "all-minilm-l6-v2"),
        ("  ALL-MINILM-L6-V2 ", "openvino-embed", "all-minilm-l6-v2"),
        ("efficientnet-lite0", "openvino-classify", "efficientnet-lite0"),
        ("fake:echo", "fake", "echo"),
        ("FAKE:Echo_1.b-2", "fake", "Echo_1.b-2"),
        ("fake:slow:250", "fake", "slow"),
        ("fake:slow:0.5", "fake", "slow"),
        ("fake:name=slow,latency_ms=3", "fake", "slow"),
        ("openai:name=smollm2,base_url=http://127.0.0.1:9", "openai", "smollm2"),
        ("ovms:name=nsfw,model=open_nsfw,base_url=http://127.0.0.1:9", "ovms", "nsfw"),
        ("openvino:name=nsfw,path=/m/nsfw.onnx,task=classify", "openvino", "nsfw"),
        ("torch-classify:device=cpu", "torch-classify", "efficientnet-lite0"),
    ],
)
def test_specs_parse(text: str, kind: str, name: str) -> None:
    spec = parse_model_spec(text)
    assert (spec.kind, spec.name) == (kind, name)
    assert parse_model_spec(str(spec)) == spec  # str() is what was written, and parses back


def test_default_model_is_the_embedded_minilm() -> None:
    spec = parse_model_spec(DEFAULT_MODEL)
    assert (spec.kind, spec.name) == ("openvino-embed", "all-minilm-l6-v2")


def test_flag_values_are_typed() -> None:
    spec = parse_model_spec(
        "openai:name=s,base_url=http://127.0.0.1:9,max_tokens=16,check_model=false,"
        "flavor=vllm,lora_adapters=a=/x|b=/y,timeout_s=2.5"
    )
    config = spec.config
    assert config.max_tokens == 16 and config.check_model is False
    assert config.lora_adapters == (("a", "/x"), ("b", "/y"))
    assert config.endpoint.timeout_s == 2.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpt-4", "unknown model 'gpt-4'; available: all-minilm-l6-v2"),
        ("", "unknown model"),
        ("fake", "unknown model"),
        ("fake:", "unknown model"),
        ("resnet:name=x", "unknown model"),
        ("fake:has space", "fake model name"),
        ("fake:-lead", "fake model name"),
        ("fake:" + "n" * 129, "fake model name"),
        ("fake:x:-1", "latency '-1'"),
        ("fake:x:abc", "latency 'abc'"),
        ("fake:x:nan", "latency 'nan'"),
        ("fake:x:inf", "latency 'inf'"),
        ("fake:x:1:2", "latency '1:2'"),
        ("openai:name=s", r"base_url: required"),
        ("openai:name=s,base_url=http://h:1,temprature=1", r"unknown field\(s\) temprature"),
        ("openvino-classify:precision=int3", r"precision"),
        ("openvino:name=x,task=t", r"path: required"),
        ("fake:name=x,batch_max=-2", r"batch_max: expected an integer"),
        ("openai:name=s,base_url", "expected key=value"),
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
    text = str(raised.value)
    assert "all-minilm-l6-v2" in text and "fake:NAME" in text and "openai" in text


def test_config_tables_with_backends() -> None:
    config = tomllib.loads(
        """
        [backends.llama]
        base_url = "http://127.0.0.1:9"
        key_env = "LLAMA_KEY"
        max_concurrency = 4

        [[models]]
        kind = "openai"
        name = "smollm2"
        backend = "llama"
        max_tokens = 64

        [[models]]
        name = "efficientnet-lite0"
        batch_max = 16

        [[models]]
        kind = "fake"
        name = "echo"
        """
    )
    os.environ["LLAMA_KEY"] = "sk-test-not-a-real-key"
    try:
        specs = specs_from_config(config, "config.toml")
    finally:
        del os.environ["LLAMA_KEY"]
    assert [(s.kind, s.name) for s in specs] == [
        ("openai", "smollm2"),
        ("openvino-classify", "efficientnet-lite0"),
        ("fake", "echo"),
    ]
    assert specs[0].config.endpoint.max_concurrency == 4
    assert specs[1].batching is not None and specs[1].batching.max_batch == 16
    assert "sk-test" not in repr(specs[0]) and "sk-test" not in str(specs[0])


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[models]]\nname = "x"\nbackend = "nope"', r"models\[0\].backend: no \[backends.nope\]"),
        ('[[models]]\nkind = "openvino"\nname = "x"\ntask = 3', r"models\[0\].path|task"),
        ('[[models]]\nname = "whatever"', r"models\[0\].kind: unknown kind ''"),
        ("models = 3", "models: expected"),
    ],
)
def test_bad_config_tables_name_the_field(toml: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        specs_from_config(tomllib.loads(toml), "config.toml")


async def test_batch_max_wraps_the_runner(tmp_path: Path) -> None:
    runner = build_runner(parse_model_spec("fake:name=echo,batch_max=8"), tmp_path)
    assert isinstance(runner, BatchingRunner) and isinstance(runner.inner, FakeRunner)
    assert runner.info.extra["batch_max"] == 8


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


def test_the_readme_config_example_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("LLAMA_KEY_1", "k1")
    monkeypatch.setenv("LLAMA_KEY_2", "k2")
    specs = specs_from_config(tomllib.loads(block), "README.md")
    assert [s.kind for s in specs] == ["openai", "openvino-classify", "ovms"]


def test_the_default_model_takes_the_openvino_compile_options() -> None:
    spec = parse_model_spec(
        "openvino-embed:device=AUTO,performance_hint=throughput,inference_precision=bf16"
    )
    config = spec.config
    assert (config.device, config.performance_hint, config.inference_precision) == (
        "AUTO",
        "THROUGHPUT",
        "bf16",
    )
    assert parse_model_spec("openvino-embed:precision=int8").config.precision == "int8"
    with pytest.raises(ModelSpecError, match="precision"):
        parse_model_spec("openvino-embed:precision=int3")
    with pytest.raises(ModelSpecError, match="int4 moves its embeddings too far"):
        parse_model_spec("openvino-embed:precision=int4")
    with pytest.raises(ModelSpecError, match="device: expected an OpenVINO device"):
        parse_model_spec("openvino-embed:device=gpu-1!")
