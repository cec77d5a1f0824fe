"""The Open Inference Protocol's minimum (KServe v2 / Triton HTTP): health, model metadata, JSON tensor infer.

``POST /v2/models/<name>/infer`` runs the active model on the tensors as given (the model's own
layout and dtype, no preprocessing) and answers every output as a flat JSON list, row-major.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
from aiohttp import web

from agent.runtimes.base import TensorSpec
from agent.web.backend import WebBackend

DATATYPES = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "uint8": "UINT8", "int8": "INT8",
             "int16": "INT16", "int32": "INT32", "int64": "INT64", "bool": "BOOL"}
DTYPES = {v: np.dtype(k) for k, v in DATATYPES.items()}
MAX_ELEMENTS = 16 * 2**20  # a tensor larger than this is refused before it is built
INFER_TIMEOUT_S = 15.0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _spec(t: TensorSpec) -> dict:
    return {"name": t.name, "datatype": DATATYPES.get(np.dtype(t.dtype).name, np.dtype(t.dtype).name.upper()),
            "shape": [int(d) if d and d > 0 else -1 for d in t.shape]}


def parse_inputs(body: object, specs: tuple[TensorSpec, ...]) -> list[np.ndarray]:
    """The request's ``inputs`` as arrays in the model's input order; ValueError says what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ValueError('the body must be a JSON object with "inputs": [{"name", "shape", "datatype", "data"}]')
    given = {}
    for item in body["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("each input needs a name")
        given[item["name"]] = item
    arrays = []
    for spec in specs:
        item = given.get(spec.name) or (next(iter(given.values())) if len(specs) == len(given) == 1 else None)
        if item is None:
            raise ValueError(f"input {spec.name!r} is missing (the model takes {', '.join(s.name for s in specs)})")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"input {item['name']!r}: shape must be a list of sizes")
        want = tuple(int(d) if d and d > 0 else -1 for d in spec.shape)
        if len(shape) != len(want) or any(w != -1 and w != s for w, s in zip(want, shape, strict=True)):
            raise ValueError(f"input {item['name']!r}: shape {shape} does not fit the model's {list(want)}")
        n = int(np.prod(shape)) if shape else 1
        if n > MAX_ELEMENTS:
            raise ValueError(f"input {item['name']!r}: {n} elements is more than {MAX_ELEMENTS}")
        dtype = DTYPES.get(str(item.get("datatype")))
        if dtype is None:
            raise ValueError(f"input {item['name']!r}: datatype must be one of {', '.join(DTYPES)}")
        data = item.get("data")
        try:
            arr = np.asarray(data, dtype=dtype).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"input {item['name']!r}: data must be a (flat or nested) list of numbers that fit "
                             f"{item.get('datatype')}") from None
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"input {item['name']!r}: data must be finite numbers (no NaN or infinity)")
        if arr.size != n:
            raise ValueError(f"input {item['name']!r}: {arr.size} values for shape {shape} ({n})")
        arrays.append(arr.reshape(shape).astype(spec.dtype, copy=False))
    return arrays


def body_limit(specs: tuple[TensorSpec, ...]) -> int:
    """The largest JSON body taken for these inputs: 24 bytes a number (-1.2345678901234567e-05,) and 64 KiB."""
    elements = sum(int(np.prod([d if d and d > 0 else 1 for d in s.shape])) for s in specs)
    return 24 * elements + 2**16


def _parse(raw: bytes, specs: tuple[TensorSpec, ...]) -> tuple[dict, list[np.ndarray]]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError("the body is not JSON") from None
    return body, parse_inputs(body, specs)


def _json_numbers(arr: np.ndarray) -> list:
    """Flat values for JSON; NaN and infinity (which strict JSON has no words for) become null."""
    flat = arr.reshape(-1)
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [v if np.isfinite(v) else None for v in flat.tolist()]
    return flat.tolist()


def add_routes(app: web.Application, backend: WebBackend) -> None:
    def model_or_404(request: web.Request) -> tuple[dict, tuple, tuple] | web.Response:
        info, inputs, outputs = backend.model_io()
        if request.match_info["name"] != info.get("name"):
            return _error(404, f"no model {request.match_info['name'][:80]!r}; this device serves {info.get('name')!r}")
        version = request.match_info.get("version")
        if version is not None and version != info.get("version"):
            return _error(404, f"version {version[:40]!r} is not the one serving ({info.get('version')})")
        return info, inputs, outputs

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(request: web.Request) -> web.Response:
        ok = backend.alive()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    async def metadata(request: web.Request) -> web.Response:
        found = model_or_404(request)
        if isinstance(found, web.Response):
            return found
        info, inputs, outputs = found
        return web.json_response({"name": info["name"], "versions": [info["version"]],
                                  "platform": info.get("platform", ""),
                                  "inputs": [_spec(t) for t in inputs], "outputs": [_spec(t) for t in outputs]})

    async def model_ready(request: web.Request) -> web.Response:
        found = model_or_404(request)
        if isinstance(found, web.Response):
            return found
        return web.json_response({"name": found[0]["name"], "ready": backend.alive()})

    async def infer(request: web.Request) -> web.Response:
        found = model_or_404(request)
        if isinstance(found, web.Response):
            return found
        info, inputs, outputs = found
        limit = body_limit(inputs)
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"the body is {request.content_length} bytes; at most {limit} for this model's inputs")
        chunks, size = [], 0
        while chunk := await request.content.read(2**16):
            size += len(chunk)
            if size > limit:
                return _error(413, f"the body is over {limit} bytes, at most for this model's inputs")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:  # parsing is not the loop's work: a large body would hold every other request up
            body, tensors = await asyncio.to_thread(_parse, raw, inputs)
        except ValueError as exc:
            return _error(400, str(exc))
        try:
            results = await asyncio.to_thread(backend.infer_raw, tensors, INFER_TIMEOUT_S)
        except TimeoutError as exc:
            return _error(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the runtime refused these tensors: one line
            return _error(400, f"the model failed on these inputs: {type(exc).__name__}: {str(exc)[:300]}")
        out = [{"name": spec.name, "datatype": DATATYPES.get(arr.dtype.name, arr.dtype.name.upper()),
                "shape": list(arr.shape), "data": _json_numbers(arr)}
               for spec, arr in zip(outputs, results, strict=False)]
        reply = {"model_name": info["name"], "model_version": info["version"], "outputs": out}
        if isinstance(body.get("id"), str):
            reply["id"] = body["id"]
        return web.json_response(reply)

    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2/models/{name}", metadata)
    r.add_get("/v2/models/{name}/ready", model_ready)
    r.add_post("/v2/models/{name}/infer", infer)
    r.add_get("/v2/models/{name}/versions/{version}", metadata)
    r.add_post("/v2/models/{name}/versions/{version}/infer", infer)
