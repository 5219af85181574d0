"""Open Inference Protocol (KServe v2 / Triton) tensors: JSON, binary and gRPC (de)serialisation.

A ``Tensor`` holds its elements as a flat Python list (``bytes`` for BYTES, ``bool``, ``int``
or ``float``). This module knows nothing about models; it turns wire formats into tensors and
back, and every malformed input raises ``V2Error`` naming the tensor at fault.

* REST, JSON: ``{"inputs": [{"name", "datatype", "shape", "data"}], "outputs": [...], ...}``.
* REST, binary (Triton's extension, tritonclient.http's default): the JSON header is the first
  ``Inference-Header-Content-Length`` bytes of the body; each input whose
  ``parameters.binary_data_size`` is set takes that many bytes, in order, from what follows.
  Outputs go binary when asked (``outputs[i].parameters.binary_data`` or the request parameter
  ``binary_data_output``), with the same layout in the response.
* gRPC: ``raw_input_contents`` (tritonclient.grpc) or typed ``contents``; responses always use
  ``raw_output_contents`` (tritonclient.grpc reads only those).

Raw layout: little-endian fixed-size elements; BOOL one byte; BYTES each element as a 4-byte
little-endian length followed by its bytes.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.json_body import JSONBodyError, parse_json

HEADER_LENGTH = "inference-header-content-length"

_NUMPY = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = frozenset(_NUMPY) | {"BYTES"}

# gRPC InferTensorContents field per datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class V2Error(Exception):
    """A request the server cannot serve: HTTP ``status`` (gRPC code derived from it) + message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's default


@dataclass
class DecodedRequest:
    """A v2 inference request, transport-independent."""

    id: str
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    parameters: dict[str, Any]
    model_version: str = ""

    @property
    def binary_default(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


def num_elements(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _check_shape(name: str, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise V2Error(f"input '{name}': shape must be a list of non-negative integers, got {shape!r}")
    return shape


# -- raw (binary) elements --------------------------------------------------------------------------
def deserialize(name: str, datatype: str, raw: bytes, shape: list[int]) -> list[Any]:
    """The elements of one raw tensor; the count must match ``shape``."""
    count = num_elements(shape)
    if datatype == "BYTES":
        out, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise V2Error(f"input '{name}': truncated BYTES element length at offset {pos}")
            (n,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + n > len(raw):
                raise V2Error(f"input '{name}': BYTES element of {n} bytes runs past the end of the data")
            out.append(bytes(raw[pos:pos + n]))
            pos += n
    elif datatype in _NUMPY:
        dt = _NUMPY[datatype]
        if len(raw) % dt.itemsize:
            raise V2Error(f"input '{name}': {len(raw)} bytes is not a whole number of {datatype} elements")
        out = np.frombuffer(raw, dtype=dt).tolist()
    else:
        raise V2Error(f"input '{name}': unsupported datatype {datatype!r}")
    if len(out) != count:
        raise V2Error(f"input '{name}': shape {shape} needs {count} elements, the data holds {len(out)}")
    return out


def serialize(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in data:
            b = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(b)))
            parts.append(b)
        return b"".join(parts)
    return np.asarray(data, dtype=_NUMPY[datatype]).tobytes()


# -- JSON elements ----------------------------------------------------------------------------------
def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        out: list[Any] = []
        for item in data:
            out.extend(_flatten(item))
        return out
    return [data]


def _from_json(name: str, datatype: str, data: Any, shape: list[int]) -> list[Any]:
    flat = _flatten(data)
    count = num_elements(shape)
    if len(flat) != count:
        raise V2Error(f"input '{name}': shape {shape} needs {count} elements, data holds {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise V2Error(f"input '{name}': BYTES data must be strings in JSON (or sent as binary data)")
        return [x.encode() for x in flat]
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise V2Error(f"input '{name}': BOOL data must be true or false")
        return flat
    if datatype.startswith(("INT", "UINT")):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in flat):
            raise V2Error(f"input '{name}': {datatype} data must be integers")
        return flat
    if datatype.startswith("FP"):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
            raise V2Error(f"input '{name}': {datatype} data must be numbers")
        return [float(x) for x in flat]
    raise V2Error(f"input '{name}': unsupported datatype {datatype!r}")


def _to_json(datatype: str, data: list[Any]) -> list[Any]:
    if datatype == "BYTES":
        return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in data]
    return list(data)


# -- REST -------------------------------------------------------------------------------------------
def _decompress(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(f"unsupported Content-Encoding {encoding!r}", 415)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    try:
        return _inflate(body, wbits, max_bytes)
    except zlib.error as exc:
        raise V2Error(f"the request body is not valid {encoding} data: {exc}") from exc


def _inflate(data: bytes, wbits: int, max_bytes: int) -> bytes:
    """Inflate ``data`` (every gzip member) to at most ``max_bytes``: a 200 KiB gzip body of zeros
    inflates to 200 MiB, so the output is bounded while inflating, not after (413 past it)."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, max_bytes + 1 - len(out))
        if len(out) > max_bytes:
            raise V2Error(f"the request body inflates past the limit of {max_bytes} bytes "
                          "(--max-request-body-bytes)", 413)
        if not inflater.eof:
            raise zlib.error("truncated data")
        data = inflater.unused_data
    return bytes(out)


def decode_rest_request(body: bytes, headers: dict[str, str], max_bytes: int = 64 * 1024 * 1024) -> DecodedRequest:
    """A REST v2 infer body (JSON, or JSON header + binary tensors) -> ``DecodedRequest``;
    a compressed body may inflate to ``max_bytes``."""
    body = _decompress(body, headers.get("content-encoding"), max_bytes)
    header_len = headers.get(HEADER_LENGTH)
    if header_len is not None:
        try:
            n = int(header_len)
        except ValueError:
            raise V2Error(f"Inference-Header-Content-Length: not an integer: {header_len!r}") from None
        if not 0 <= n <= len(body):
            raise V2Error(f"Inference-Header-Content-Length: {n} is outside the body's {len(body)} bytes")
        head, binary = body[:n], memoryview(body)[n:]
    else:
        head, binary = body, memoryview(b"")
    try:
        req = parse_json(bytes(head), "the JSON header" if header_len is not None else "the request body")
    except JSONBodyError as exc:
        raise V2Error(str(exc)) from exc
    if not isinstance(req, dict):
        raise V2Error("the request body must be a JSON object")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise V2Error("parameters: must be a JSON object")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list):
        raise V2Error("inputs: a list of input tensors is required")
    inputs, offset = [], 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise V2Error(f"inputs[{i}]: each input needs a 'name'")
        name = t["name"]
        datatype = t.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise V2Error(f"input '{name}': unknown datatype {datatype!r}")
        shape = _check_shape(name, t.get("shape"))
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise V2Error(f"input '{name}': parameters must be a JSON object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise V2Error(f"input '{name}': binary_data_size {size!r} does not fit the "
                              f"{len(binary) - offset} bytes of binary data left")
            data = deserialize(name, datatype, bytes(binary[offset:offset + size]), shape)
            offset += size
        elif "data" in t:
            data = _from_json(name, datatype, t["data"], shape)
        else:
            raise V2Error(f"input '{name}': has neither 'data' nor parameters.binary_data_size")
        inputs.append(Tensor(name, datatype, shape, data, tparams))
    if offset != len(binary):
        raise V2Error(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = None
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise V2Error("outputs: must be a list")
        outputs = []
        for o in req["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise V2Error("outputs: each requested output needs a 'name'")
            op = o.get("parameters") or {}
            binary_flag = op.get("binary_data") if isinstance(op, dict) else None
            outputs.append(RequestedOutput(o["name"], None if binary_flag is None else bool(binary_flag)))
    rid = req.get("id", "")
    return DecodedRequest(str(rid) if rid is not None else "", inputs, outputs, params)


def encode_rest_response(body: dict[str, Any], outputs: list[Tensor],
                         binary: list[bool]) -> tuple[bytes, dict[str, str]]:
    """The response body and headers; outputs flagged binary go after the JSON header."""
    tail: list[bytes] = []
    out_json = []
    for t, as_binary in zip(outputs, binary):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        params = dict(t.parameters)
        if as_binary:
            raw = serialize(t.datatype, t.data)
            params["binary_data_size"] = len(raw)
            tail.append(raw)
        else:
            entry["data"] = _to_json(t.datatype, t.data)
        if params:
            entry["parameters"] = params
        out_json.append(entry)
    head = json.dumps({**body, "outputs": out_json}, separators=(",", ":")).encode()
    if not tail:
        return head, {"content-type": "application/json"}
    return head + b"".join(tail), {"content-type": "application/octet-stream",
                                   "inference-header-content-length": str(len(head))}


def tensor_to_json_value(t: Tensor) -> Any:
    """One output as a JSON value for the generate extension: a scalar if it has one element."""
    data = _to_json(t.datatype, t.data)
    return data[0] if len(data) == 1 else data


# -- gRPC -------------------------------------------------------------------------------------------
def param_value(p: Any) -> Any:
    """The Python value of an ``InferParameter``."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def set_param(p: Any, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def decode_grpc_request(req: Any) -> DecodedRequest:
    """A ``ModelInferRequest`` -> ``DecodedRequest`` (raw_input_contents or typed contents)."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise V2Error(f"raw_input_contents has {len(raw)} entries for {len(req.inputs)} inputs")
    inputs = []
    for i, t in enumerate(req.inputs):
        if t.datatype not in DATATYPES:
            raise V2Error(f"input '{t.name}': unknown datatype {t.datatype!r}")
        shape = _check_shape(t.name, list(t.shape))
        if raw:
            if t.HasField("contents"):
                raise V2Error(f"input '{t.name}': contents must not be set when raw_input_contents is used")
            data = deserialize(t.name, t.datatype, raw[i], shape)
        else:
            field_name = _CONTENTS_FIELD.get(t.datatype)
            if field_name is None:
                raise V2Error(f"input '{t.name}': {t.datatype} needs raw_input_contents")
            data = list(getattr(t.contents, field_name))
            if len(data) != num_elements(shape):
                raise V2Error(f"input '{t.name}': shape {shape} needs {num_elements(shape)} elements, "
                              f"contents hold {len(data)}")
            if t.datatype == "BYTES":
                data = [bytes(x) for x in data]
        inputs.append(Tensor(t.name, t.datatype, shape, data,
                             {k: param_value(v) for k, v in t.parameters.items()}))
    outputs = [RequestedOutput(o.name) for o in req.outputs] if len(req.outputs) else None
    params = {k: param_value(v) for k, v in req.parameters.items()}
    return DecodedRequest(req.id, inputs, outputs, params, req.model_version)


def encode_grpc_response(pb: Any, model_name: str, model_version: str, rid: str, outputs: list[Tensor],
                         parameters: dict[str, Any] | None = None) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents``."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=rid)
    for key, value in (parameters or {}).items():
        set_param(resp.parameters[key], value)
    for t in outputs:
        out = resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        for key, value in t.parameters.items():
            set_param(out.parameters[key], value)
        resp.raw_output_contents.append(serialize(t.datatype, t.data))
    return resp
