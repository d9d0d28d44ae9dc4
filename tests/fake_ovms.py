"""FakeOVMS: the OpenVINO Model Server routes no stand-in server serves, on 127.0.0.1.

A fake, not OVMS: OVMS ships only as a container, and kserve (the real KServe
v2 stand-in, see kserve_standin.py) has no versioned paths, no TF-Serving model
status or metadata, and no config API. This serves those routes as OVMS's
documentation describes them ("TensorFlow Serving compatible RESTful API":
model status, model metadata with camelCase GetModelMetadataResponse JSON,
``:predict`` in row and column format, config reload answering 201/200 with
every model's status, config status; "KServe compatible RESTful API":
versioned ``/v2/models/{m}/versions/{v}`` ready, metadata and infer; errors
as ``{"error": "..."}`` with 404 for an unknown model or version).

Its models compute something trivial so a test can check the numbers:
``affine`` version N answers ``y = 2 * x + N`` for float32 ``x`` of shape
[-1, 3]; ``warming`` has one version still LOADING.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fake_backend import FakeBackend, Reply, Seen

MODEL = "affine"
VERSIONS = (1, 2)
LOADING_MODEL = "warming"
NOT_FOUND = {"error": "Model with requested name is not found"}


def _status(version: int, state: str = "AVAILABLE") -> dict[str, Any]:
    return {
        "version": str(version),
        "state": state,
        "status": {"error_code": "OK", "error_message": ""},
    }


def _dims(*sizes: int) -> dict[str, Any]:
    return {"dim": [{"size": str(s)} for s in sizes]}


class FakeOVMS(FakeBackend):
    """``with FakeOVMS() as ovms:`` serves the routes above at ``ovms.url``."""

    def __init__(self) -> None:
        super().__init__()
        self.reloads = 0
        statuses = [_status(v) for v in VERSIONS]
        self._config = {
            MODEL: {"model_version_status": statuses},
            LOADING_MODEL: {"model_version_status": [_status(1, "LOADING")]},
        }
        base = f"/v1/models/{MODEL}"
        self.route("GET", base, lambda s: Reply(200, {"model_version_status": statuses}))
        self.route("GET", f"{base}/metadata", lambda s: self._tfs_metadata(VERSIONS[-1]))
        self.route("POST", f"{base}:predict", lambda s: self._predict(s, VERSIONS[-1]))
        v2 = f"/v2/models/{MODEL}"
        self.route("GET", f"{v2}/ready", lambda s: Reply(200, None))
        self.route("GET", v2, lambda s: self._v2_metadata())
        self.route("POST", f"{v2}/infer", lambda s: self._infer(s, VERSIONS[-1]))
        for v in VERSIONS:
            self._versioned(v)
        self.route(
            "GET",
            f"/v1/models/{LOADING_MODEL}",
            lambda s: Reply(200, self._config[LOADING_MODEL]),
        )
        self.route("GET", "/v1/config", lambda s: Reply(200, self._config))
        self.route("POST", "/v1/config/reload", self._reload)
        self.route("GET", "/v2/health/live", lambda s: Reply(200, None))
        self.route("GET", "/v2/health/ready", lambda s: Reply(200, None))

    def _versioned(self, v: int) -> None:
        base = f"/v1/models/{MODEL}/versions/{v}"
        self.route("GET", base, lambda s: Reply(200, {"model_version_status": [_status(v)]}))
        self.route("GET", f"{base}/metadata", lambda s: self._tfs_metadata(v))
        self.route("POST", f"{base}:predict", lambda s: self._predict(s, v))
        v2 = f"/v2/models/{MODEL}/versions/{v}"
        self.route("GET", f"{v2}/ready", lambda s: Reply(200, None))
        self.route("GET", v2, lambda s: self._v2_metadata(v))
        self.route("POST", f"{v2}/infer", lambda s: self._infer(s, v))

    def _next(self, seen: Seen) -> Reply:
        reply = super()._next(seen)
        if reply.status == 404 and isinstance(reply.body, dict) and "no route" in str(reply.body):
            return Reply(404, NOT_FOUND)  # OVMS's own words for any unknown model or version
        return reply

    def _reload(self, seen: Seen) -> Reply:
        self.reloads += 1
        # The first reload applies a changed config (201), later ones find nothing new (200).
        return Reply(201 if self.reloads == 1 else 200, self._config)

    def _tfs_metadata(self, v: int) -> Reply:
        tensor = {"dtype": "DT_FLOAT", "tensorShape": _dims(-1, 3)}
        return Reply(
            200,
            {
                "modelSpec": {"name": MODEL, "signatureName": "", "version": str(v)},
                "metadata": {
                    "signature_def": {
                        "@type": "type.googleapis.com/tensorflow.serving.SignatureDefMap",
                        "signatureDef": {
                            "serving_default": {
                                "inputs": {"x": {"name": "x", **tensor}},
                                "outputs": {"y": {"name": "y", **tensor}},
                                "methodName": "tensorflow/serving/predict",
                            }
                        },
                    }
                },
            },
        )

    def _v2_metadata(self, v: int | None = None) -> Reply:
        return Reply(
            200,
            {
                "name": MODEL,
                "versions": [str(x) for x in VERSIONS] if v is None else [str(v)],
                "platform": "OpenVINO",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
            },
        )

    @staticmethod
    def _affine(x: Any, v: int) -> np.ndarray[Any, Any]:
        array = np.asarray(x, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != 3:
            raise ValueError(f"x has shape {list(array.shape)}, expected [-1, 3]")
        return 2 * array + v

    def _predict(self, seen: Seen, v: int) -> Reply:
        body = seen.json()
        try:
            if "instances" in body:
                rows = body["instances"]
                xs = [r["x"] if isinstance(r, dict) else r for r in rows]
                ys = self._affine(xs, v)
                if rows and isinstance(rows[0], dict):
                    return Reply(200, {"predictions": [{"y": row.tolist()} for row in ys]})
                return Reply(200, {"predictions": ys.tolist()})
            cols = body["inputs"]
            x = cols["x"] if isinstance(cols, dict) else cols
            return Reply(200, {"outputs": {"y": self._affine(x, v).tolist()}})
        except (KeyError, TypeError, ValueError) as exc:
            return Reply(400, {"error": f"Invalid input: {exc}"})

    def _infer(self, seen: Seen, v: int) -> Reply:
        body = seen.json()
        try:
            (item,) = body["inputs"]
            x = np.asarray(item["data"], dtype=np.float32).reshape(item["shape"])
            y = self._affine(x, v)
        except (KeyError, TypeError, ValueError) as exc:
            return Reply(400, {"error": f"Invalid input: {exc}"})
        out = {"name": "y", "datatype": "FP32", "shape": list(y.shape), "data": y.ravel().tolist()}
        return Reply(
            200,
            {
                "model_name": MODEL,
                "model_version": str(v),
                "id": body.get("id", ""),
                "outputs": [out],
            },
        )
