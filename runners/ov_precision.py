"""Writing an OpenVINO model at a chosen weight precision, and the child process that does it.

``fp32`` keeps the weights as they are; ``fp16`` stores them as halves
(``ov.save_model(compress_to_fp16=True)``; the device still computes at its
inference precision); ``int8`` and ``int4`` compress the weights of matmuls and
convolutions with ``nncf.compress_weights`` (data-free; int8 is per-channel
asymmetric, int4 is group-wise symmetric with int8 kept for the first and last
layers, as nncf does by default). The precision changes the IR, so callers put
it in their cache fingerprint. On a CNN such as EfficientNet-Lite0 int4 gives
the same file as int8: nncf compresses matmuls to int4, convolutions stay int8,
and the one matmul (the classifier) is a last layer, kept at int8.

nncf is imported only here and only in a child process (``python -m
runners.ov_precision SRC OUT_DIR PRECISION``): it is a large import and the
daemon never needs it after the IR is written.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError

XML = "model.xml"
BIN = "model.bin"
FILES = (XML, BIN)


def save(model: Any, out: Path, precision: str) -> None:
    """Write ``model`` (an ``ov.Model``, changed in place) as ``out/model.xml`` + ``.bin``."""
    import openvino as ov

    if precision in ("int8", "int4"):
        warnings.filterwarnings("ignore")  # nncf's progress and deprecation noise
        import nncf

        mode = (
            nncf.CompressWeightsMode.INT8_ASYM
            if precision == "int8"
            else (nncf.CompressWeightsMode.INT4_SYM)
        )
        model = nncf.compress_weights(model, mode=mode)
    elif precision not in ("fp32", "fp16"):
        raise ConfigError(f"unknown precision {precision!r}")
    ov.save_model(model, str(out / XML), compress_to_fp16=precision == "fp16")


def main(argv: list[str] | None = None) -> int:
    """Read SRC (IR .xml or .onnx), write it at PRECISION into the existing dir OUT_DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m runners.ov_precision SRC OUT_DIR PRECISION", file=sys.stderr)
        return 2
    src, out, precision = Path(args[0]), Path(args[1]), args[2]
    if not out.is_dir():
        print(f"{out} is not a directory", file=sys.stderr)
        return 2
    import openvino as ov

    save(ov.Core().read_model(str(src)), out, precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
