"""The OpenVINO all-MiniLM-L6-v2 runner, on the real model.

The model is converted once per session (a child process, ~10 s) into a shared
models dir; tests that damage a cache work on copies of it. Embeddings are
checked against sentence-transformers, the reference implementation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import trio
from conftest import GARBAGE
from support import undeclared

from protocols import ConfigError, ErrorCode, Tensor, Value
from runners import convert_minilm, ir_cache
from runners.errors import BadInput, ModelLoadError, RunnerError
from runners.openvino_embed import (
    DIM,
    MAX_BATCH,
    MAX_CHARS,
    MAX_TOKENS,
    MODEL_NAME,
    EmbedConfig,
    OpenVINOEmbedRunner,
    cache_key,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A peer-to-peer swarm serves inference to its members.",
    "Ünïcödé, тест, 日本語のテキスト.",
    "",
    "long " * 400,  # over MAX_TOKENS: truncated the way sentence-transformers truncates
]


@pytest.fixture(scope="session")
def reference() -> np.ndarray:
    """sentence-transformers' embeddings of TEXTS."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(convert_minilm.model_dir()), device="cpu")
    return np.asarray(model.encode(TEXTS), dtype=np.float32)


# The conversion's own numbers: fp32 weights computed in f32. The default (auto)
# precision has tests of its own in test_precision_choice.py.
REFERENCE = EmbedConfig(precision="fp32", inference_precision="f32")


@pytest.fixture(scope="session")
def runner(models_dir: Path) -> OpenVINOEmbedRunner:
    """One loaded runner for the session (each load compiles and probes: ~0.4 s),
    pinned to fp32/f32.

    Its trio lock and limiter are not tied to one trio.run, so each test's own
    run may use it.
    """
    r = OpenVINOEmbedRunner(models_dir, REFERENCE)
    trio.run(r.load)
    return r


@pytest.fixture
def unloaded(tmp_path: Path) -> OpenVINOEmbedRunner:
    """Enough for ``check``, which must not need the model."""
    return OpenVINOEmbedRunner(tmp_path)


def entries(root: Path) -> list[str]:
    """The names of ``root``'s IR entries and staging dirs (not its int8/ subdir,
    nor the cached precision choice)."""
    prefixes = (ir_cache.ENTRY_PREFIX, ir_cache.STAGING_PREFIX, ir_cache.TRASH_PREFIX)
    return sorted(p.name for p in root.iterdir() if p.name.startswith(prefixes))


def entry(models_dir: Path) -> Path:
    entries = sorted((models_dir / MODEL_NAME).glob(f"{ir_cache.ENTRY_PREFIX}*"))
    assert len(entries) == 1, entries
    return entries[0]


def copy_cache(models_dir: Path, dest: Path) -> Path:
    """A private copy of the shared cache, to damage; returns its entry."""
    shutil.copytree(models_dir / MODEL_NAME, dest / MODEL_NAME)
    return entry(dest)


def tokens(texts: list[str], dtype: str = "int64") -> dict[str, Value]:
    tokenizer = convert_minilm.load_tokenizer(convert_minilm.model_dir() / "tokenizer.json")
    enc = tokenizer.encode_batch(texts)
    return {
        "input_ids": Tensor.from_numpy(np.array([e.ids for e in enc], dtype=dtype)),
        "attention_mask": Tensor.from_numpy(np.array([e.attention_mask for e in enc], dtype=dtype)),
        "token_type_ids": Tensor.from_numpy(np.array([e.type_ids for e in enc], dtype=dtype)),
    }


async def embed(runner: OpenVINOEmbedRunner, inputs: Mapping[str, Value]) -> np.ndarray:
    out = await runner.infer(inputs, {})
    assert set(out) == {"embedding", "tokens"}
    tensor, tokens = out["embedding"], out["tokens"]
    assert isinstance(tensor, Tensor) and tensor.dtype == "float32"
    assert isinstance(tokens, Tensor) and tokens.dtype == "int64"
    assert tokens.shape == tensor.shape[:1] and min(tokens.numpy()) >= 2  # [CLS] ... [SEP]
    return tensor.numpy()


async def test_embeddings_match_sentence_transformers(
    runner: OpenVINOEmbedRunner, reference: np.ndarray
) -> None:
    got = await embed(runner, {"text": TEXTS})
    assert got.shape == (len(TEXTS), DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() > 0.999, cosine


async def test_one_string_is_one_row(runner: OpenVINOEmbedRunner, reference: np.ndarray) -> None:
    got = await embed(runner, {"text": TEXTS[1]})
    assert got.shape == (1, DIM)
    assert float(got[0] @ reference[1]) > 0.999


async def test_answers_are_the_declared_outputs(runner: OpenVINOEmbedRunner) -> None:
    assert [(o.name, o.dtype, o.shape) for o in runner.info.outputs] == [
        ("embedding", "float32", (None, DIM)),
        ("tokens", "int64", (None,)),
    ]
    for inputs in ({"text": TEXTS[:2]}, tokens(TEXTS[:3], "int32")):
        assert undeclared(runner.info, await runner.infer(inputs, {})) == []


async def test_padding_in_a_batch_does_not_change_a_row(runner: OpenVINOEmbedRunner) -> None:
    alone = await embed(runner, {"text": [TEXTS[0]]})
    batched = await embed(runner, {"text": [TEXTS[4], TEXTS[0]]})  # TEXTS[0] padded to 256
    np.testing.assert_allclose(batched[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("dtype", ["int64", "int32"])
async def test_token_tensors_give_the_text_embedding(
    runner: OpenVINOEmbedRunner, dtype: str
) -> None:
    texts = TEXTS[:3]
    from_text = await embed(runner, {"text": texts})
    from_tokens = await embed(runner, tokens(texts, dtype))
    np.testing.assert_allclose(from_tokens, from_text, atol=1e-5)


async def test_mask_and_type_ids_default_for_unpadded_tokens(runner: OpenVINOEmbedRunner) -> None:
    full = tokens([TEXTS[1]])
    from_text = await embed(runner, {"text": TEXTS[1]})
    from_ids = await embed(runner, {"input_ids": full["input_ids"]})
    np.testing.assert_allclose(from_ids, from_text, atol=1e-5)


async def test_concurrent_requests_share_the_request_pool(runner: OpenVINOEmbedRunner) -> None:
    assert runner.concurrency == 2
    texts = TEXTS[:3]
    expected = await embed(runner, {"text": texts})
    results: dict[int, np.ndarray] = {}

    async def one(i: int) -> None:
        results[i] = await embed(runner, {"text": texts[i % 3 :] + texts[: i % 3]})

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert len(results) == 8
    for i, got in results.items():
        np.testing.assert_allclose(np.roll(got, i % 3, axis=0), expected, atol=1e-5)


def ids(array: list[list[int]] | np.ndarray, dtype: str = "int64") -> Tensor:
    return Tensor.from_numpy(np.asarray(array, dtype=dtype))


BAD_INPUTS: dict[str, tuple[dict[str, Value], str]] = {
    "float32 input_ids": ({"input_ids": ids([[101, 102]], "float32")}, "dtype float32"),
    "3-D input_ids": ({"input_ids": ids(np.ones((1, 2, 3)))}, "shape"),
    "text and input_ids": ({"text": "hi", "input_ids": ids([[101, 102]])}, "exactly one"),
    "nothing": ({}, "exactly one"),
    "too many texts": ({"text": ["a"] * (MAX_BATCH + 1)}, f"1 to {MAX_BATCH}"),
    "too long a text": ({"text": "a" * (MAX_CHARS + 1)}, f"at most {MAX_CHARS}"),
    "empty text list": ({"text": []}, "1 to"),
    "text of ints": ({"text": 3}, "string"),
    "mask shape": (
        {"input_ids": ids([[101, 7, 102]]), "attention_mask": ids([[1, 1]])},
        "'attention_mask' has shape [1, 2], expected [1, 3]",
    ),
    "float mask": (
        {"input_ids": ids([[101, 102]]), "attention_mask": ids([[1, 1]], "float32")},
        "attention_mask",
    ),
    "mask with text": ({"text": "hi", "attention_mask": ids([[1]])}, "go with 'input_ids'"),
    "too many tokens": ({"input_ids": ids(np.ones((1, MAX_TOKENS + 1)))}, "tokens per row"),
    # Built by hand: Tensor.from_numpy cannot wrap an empty array (memoryview.cast refuses).
    "no tokens": ({"input_ids": Tensor("int64", (1, 0), b"")}, "tokens per row"),
    "too large a batch": ({"input_ids": ids(np.ones((MAX_BATCH + 1, 4)))}, "batch"),
    "id out of vocab": ({"input_ids": ids([[101, 30522]])}, "'input_ids' has values"),
    "negative id": ({"input_ids": ids([[-1, 102]])}, "'input_ids' has values"),
    "mask of 2": (
        {"input_ids": ids([[101, 102]]), "attention_mask": ids([[1, 2]])},
        "'attention_mask' has values",
    ),
    "row without tokens": (
        {"input_ids": ids([[101, 102], [101, 102]]), "attention_mask": ids([[1, 1], [0, 0]])},
        "at least one 1",
    ),
    "type id 2": (
        {"input_ids": ids([[101, 102]]), "token_type_ids": ids([[0, 2]])},
        "'token_type_ids' has values",
    ),
    "unknown input": ({"text": "hi", "images": "x"}, "unknown inputs"),
    "bytes not matching shape": (
        {"input_ids": Tensor("int64", (1, 4), b"\0" * 8)},
        "do not fit",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_are_refused_by_check(unloaded: OpenVINOEmbedRunner, case: str) -> None:
    inputs, message = BAD_INPUTS[case]
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        unloaded.check(inputs, {})
    assert info.value.code is ErrorCode.BAD_REQUEST


async def test_bad_inputs_are_refused_by_infer_too(runner: OpenVINOEmbedRunner) -> None:
    with pytest.raises(BadInput, match="dtype float32"):
        await runner.infer({"input_ids": ids([[101, 102]], "float32")}, {})


async def test_infer_before_load_is_a_runner_error(unloaded: OpenVINOEmbedRunner) -> None:
    with pytest.raises(RunnerError, match="not loaded") as info:
        await unloaded.infer({"text": "hi"}, {})
    assert not isinstance(info.value, BadInput)


def test_model_info_announces_the_model(unloaded: OpenVINOEmbedRunner) -> None:
    info = unloaded.info.describe()
    assert (info["name"], info["task"], info["runner"], info["precision"]) == (
        "all-minilm-l6-v2",
        "embeddings",
        "openvino",
        "auto",  # until a load chooses
    )
    assert info["inference_precision"] == "auto"
    assert info["dim"] == DIM and info["max_batch"] == MAX_BATCH
    assert info["context_length"] == MAX_TOKENS
    assert {s["name"]: s["required"] for s in info["inputs"]} == {
        "text": False,
        "input_ids": False,
        "attention_mask": False,
        "token_type_ids": False,
    }


async def test_load_is_idempotent(models_dir: Path) -> None:
    runner = OpenVINOEmbedRunner(models_dir)
    await runner.load()
    session = runner._session  # the compiled model; a second load must keep it
    await runner.load()
    assert runner._session is session and runner.loaded
    await runner.close()
    assert not runner.loaded


async def test_warm_cache_is_reused_not_converted(models_dir: Path) -> None:
    xml = entry(models_dir) / convert_minilm.XML
    before = xml.stat()
    runner = OpenVINOEmbedRunner(models_dir)
    with trio.fail_after(5):  # a conversion takes longer than this
        await runner.load()
    after = xml.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert entries(models_dir / MODEL_NAME) == [entry(models_dir).name]


@pytest.fixture
def cache_copy(models_dir: Path, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the converted entry, under tmp_path."""
    yield copy_cache(models_dir, tmp_path)


def zero_in_place(path: Path) -> None:
    """Every byte zero, the size unchanged: damage only a content check can see."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(0)
        f.truncate(size)


def key_of(path: Path) -> str:
    return path.name.removeprefix(ir_cache.ENTRY_PREFIX)


def test_whole_entry_is_found(cache_copy: Path) -> None:
    assert ir_cache.find(cache_copy.parent, key_of(cache_copy)) == cache_copy


@pytest.mark.parametrize(
    "damage", ["truncated bin", "missing manifest", "missing xml", "other fingerprint"]
)
def test_partial_or_stale_entry_is_not_found(cache_copy: Path, damage: str) -> None:
    key = key_of(cache_copy)
    if damage == "truncated bin":
        with open(cache_copy / convert_minilm.BIN, "r+b") as f:
            f.truncate(1000)
    elif damage == "missing manifest":
        (cache_copy / ir_cache.MANIFEST).unlink()
    elif damage == "missing xml":
        (cache_copy / convert_minilm.XML).unlink()
    else:
        key = "0" * 16
    assert ir_cache.find(cache_copy.parent, key) is None


def test_staging_dir_is_never_an_entry(cache_copy: Path) -> None:
    key = key_of(cache_copy)
    staged = cache_copy.parent / f"{ir_cache.STAGING_PREFIX}crashed"
    cache_copy.rename(staged)  # whole files, but never published
    assert ir_cache.find(cache_copy.parent, key) is None


async def test_load_prunes_stale_entries_and_crash_leftovers(cache_copy: Path) -> None:
    root = cache_copy.parent
    stale = root / f"{ir_cache.ENTRY_PREFIX}{'0' * 16}"
    stale.mkdir()
    old_tmp = root / f"{ir_cache.STAGING_PREFIX}old"
    old_tmp.mkdir()
    os.utime(old_tmp, (1.0, 1.0))
    live_tmp = root / f"{ir_cache.STAGING_PREFIX}live"  # maybe another daemon converting now
    live_tmp.mkdir()
    runner = OpenVINOEmbedRunner(root.parent, REFERENCE)
    await runner.load()
    assert entries(root) == sorted([cache_copy.name, live_tmp.name])


def test_planted_damaged_entry_was_rebuilt(models_dir: Path) -> None:
    """The session fixture planted garbage under this build's key; loading replaced it."""
    path = entry(models_dir)
    assert path.name == f"{ir_cache.ENTRY_PREFIX}{cache_key()}"
    manifest = json.loads((path / ir_cache.MANIFEST).read_text())
    assert manifest["parts"]["package"]  # the runner's own manifest, not the planted one
    for name in convert_minilm.FILES:
        assert not (path / name).read_bytes().startswith(GARBAGE), name


async def test_zeroed_weights_fail_the_probe_and_the_entry_is_dropped(cache_copy: Path) -> None:
    """Sizes intact, so only the probe can tell. Reconversion is cut off at once here
    (the session fixture already proved a rebuild); what matters is the entry is not used."""
    zero_in_place(cache_copy / convert_minilm.BIN)
    assert ir_cache.find(cache_copy.parent, key_of(cache_copy)) == cache_copy

    config = EmbedConfig(precision="fp32", inference_precision="f32", convert_timeout_s=0.001)
    runner = OpenVINOEmbedRunner(cache_copy.parent.parent, config)
    with pytest.raises(ModelLoadError, match="conversion took over"):
        await runner.load()
    assert not runner.loaded
    assert entries(cache_copy.parent) == []  # damaged entry and staging both gone


async def test_unusable_models_dir_is_a_load_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    runner = OpenVINOEmbedRunner(not_a_dir)
    with pytest.raises(ModelLoadError, match="model cache"):
        await runner.load()
    assert not runner.loaded


async def test_a_device_that_cannot_compile_is_a_load_error(models_dir: Path) -> None:
    runner = OpenVINOEmbedRunner(models_dir, EmbedConfig(device="NOSUCHDEVICE"))
    with pytest.raises(ModelLoadError, match="cannot compile for NOSUCHDEVICE"):
        await runner.load()
    assert not runner.loaded
    assert ir_cache.find(models_dir / MODEL_NAME, cache_key()) is not None  # not blamed on it


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="performance_hint"):
        EmbedConfig(performance_hint="FAST")
    with pytest.raises(ConfigError, match="concurrency"):
        EmbedConfig(concurrency=0)
    with pytest.raises(ConfigError, match="inference_precision"):
        EmbedConfig(inference_precision="fp32")  # that is a weights precision
    with pytest.raises(ConfigError, match="int4 moves"):
        EmbedConfig(precision="int4")
    with pytest.raises(ConfigError, match="auto_min_cosine"):
        EmbedConfig(auto_min_cosine=1.5)


@pytest.mark.parametrize("precision", ["int8"])
async def test_compressed_weights_stay_close_to_the_reference(
    models_dir: Path, reference: np.ndarray, precision: str
) -> None:
    """int8 weights (nncf, in the converter's child process; the session's auto load
    made them): a cache root of its own beside fp32's, and embeddings within cosine
    0.99 of sentence-transformers' fp32 ones."""
    config = EmbedConfig(precision=precision, inference_precision="f32")
    runner = OpenVINOEmbedRunner(models_dir, config)
    await runner.load()
    try:
        got = await embed(runner, {"text": TEXTS})
    finally:
        await runner.close()
    assert runner.info.precision == precision
    assert cache_key(precision) != cache_key()
    assert runner.root(precision) == models_dir / MODEL_NAME / precision
    assert ir_cache.find(runner.root(precision), cache_key(precision)) is not None
    assert ir_cache.find(models_dir / MODEL_NAME, cache_key()) is not None  # fp32 kept
    cosine = np.sum(got * reference, axis=1) / np.linalg.norm(reference, axis=1)
    print(f"{precision}: cosine to fp32 min {cosine.min():.5f}")
    assert cosine.min() > 0.99, cosine
