"""What an ONNX graph takes, returns and reads, from `model.onnx`, without the onnx package.

Load compares the manifest with the graph it describes (io names, KV and logits shapes, how
many positions the rotary cache covers) so that a mismatch is one clear error naming the field,
not an onnxruntime failure in the middle of a generation. The runtime depends on onnxruntime
only, and a session costs seconds and the weights' memory; the facts needed sit in the small
`model.onnx` protobuf (the weights live in `model.onnx.data`, which is never read here), so a
minimal protobuf walk reads them in milliseconds. Field numbers are those of onnx.proto.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

# onnx.proto TensorProto.DataType values the runtime binds
FLOAT, INT32, INT64, FLOAT16 = 1, 6, 7, 10
DTYPE_NAMES = {FLOAT: "float32", INT32: "int32", INT64: "int64", FLOAT16: "float16"}

# onnx.proto field numbers
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 1, 5, 11, 12
_NODE_INPUT, _NODE_OP_TYPE = 1, 4
_TENSOR_DIMS, _TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 1, 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE = 1, 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2

ROTARY_OP, ROTARY_COS_INPUT = "GroupQueryAttention", 7

Dim = Union[int, str, None]  # a size, a symbolic name, or unknown
Value = Union[int, memoryview]


class GraphFormatError(ValueError):
    """The file is not a readable ONNX model."""


@dataclass(frozen=True)
class Tensor:
    """One graph input or output: element type (onnx code) and shape."""

    name: str
    elem_type: int
    shape: Optional[Tuple[Dim, ...]]  # None: the graph declares no shape

    @property
    def dtype(self) -> str:
        return DTYPE_NAMES.get(self.elem_type, f"onnx type {self.elem_type}")


@dataclass(frozen=True)
class GraphInfo:
    name: str  # how messages call the file, e.g. "target/model.onnx"
    inputs: dict  # name -> Tensor; inputs that an initializer fills are left out
    outputs: dict  # name -> Tensor
    rotary_positions: Optional[int]  # rows of the cos cache attention reads; None when there is none
    external_files: frozenset  # external-data locations, relative to the graph's folder


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise GraphFormatError("truncated or malformed protobuf")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[Tuple[int, Value]]:
    """(field number, value) pairs of one protobuf message; length-delimited values as views."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise GraphFormatError("truncated protobuf")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            value = 0  # fixed-width numbers: no field read here has one
        else:
            raise GraphFormatError(f"protobuf wire type {wire} is not valid here")
        if pos > end:
            raise GraphFormatError("truncated protobuf")
        yield key >> 3, value


def _message(value: Value) -> memoryview:
    if not isinstance(value, memoryview):
        raise GraphFormatError("a nested message is stored as a number")
    return value


def _text(value: Value) -> str:
    try:
        return bytes(_message(value)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise GraphFormatError("a name is not UTF-8") from e


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(value: Value) -> Iterator[int]:
    """A repeated int64 field's values, packed or not."""
    if not isinstance(value, memoryview):
        yield _int64(value)
        return
    pos = 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        yield _int64(v)


def _dim(buf: memoryview) -> Dim:
    for num, value in _fields(buf):
        if num == _DIM_VALUE and isinstance(value, int):
            return _int64(value)
        if num == _DIM_PARAM:
            return _text(value)
    return None


def _tensor(buf: memoryview) -> Tensor:
    name, elem, shape = "", 0, None
    for num, value in _fields(buf):
        if num == _VALUE_NAME:
            name = _text(value)
        elif num == _VALUE_TYPE:
            for tnum, tval in _fields(_message(value)):
                if tnum != _TYPE_TENSOR:
                    continue
                for fnum, fval in _fields(_message(tval)):
                    if fnum == _TENSOR_TYPE_ELEM and isinstance(fval, int):
                        elem = fval
                    elif fnum == _TENSOR_TYPE_SHAPE:
                        shape = tuple(_dim(_message(d)) for n, d in _fields(_message(fval)) if n == _SHAPE_DIM)
    return Tensor(name, elem, shape)


def _location(buf: memoryview) -> Optional[str]:
    """The value of an external_data entry whose key is "location"."""
    entry = {num: _text(value) for num, value in _fields(buf) if num in (_ENTRY_KEY, _ENTRY_VALUE)}
    return entry.get(_ENTRY_VALUE) if entry.get(_ENTRY_KEY) == "location" else None


def _initializer(buf: memoryview) -> Tuple[str, Tuple[int, ...], Optional[str]]:
    """Name, dims and external-data file of one TensorProto (its data is skipped, not read)."""
    name, dims, location = "", [], None
    for num, value in _fields(buf):
        if num == _TENSOR_NAME:
            name = _text(value)
        elif num == _TENSOR_DIMS:
            dims.extend(_ints(value))
        elif num == _TENSOR_EXTERNAL_DATA:
            location = _location(_message(value)) or location
    return name, tuple(dims), location


def _rotary_cos(buf: memoryview) -> Optional[str]:
    """The cos-cache input's name if this node is the attention op, else None."""
    op, inputs = "", []
    for num, value in _fields(buf):
        if num == _NODE_OP_TYPE:
            op = _text(value)
        elif num == _NODE_INPUT:
            inputs.append(_text(value))
    return inputs[ROTARY_COS_INPUT] if op == ROTARY_OP and len(inputs) > ROTARY_COS_INPUT else None


def _graph(buf: memoryview, name: str) -> GraphInfo:
    inputs, outputs, inits, cos, external = [], [], {}, None, set()
    for num, value in _fields(buf):
        if num == _GRAPH_INPUT:
            inputs.append(_tensor(_message(value)))
        elif num == _GRAPH_OUTPUT:
            outputs.append(_tensor(_message(value)))
        elif num == _GRAPH_INITIALIZER:
            init_name, dims, location = _initializer(_message(value))
            inits[init_name] = dims
            external.update([location] if location else [])
        elif num == _GRAPH_NODE and cos is None:
            cos = _rotary_cos(_message(value))
    if not inputs or not outputs:
        raise GraphFormatError("the graph declares no inputs or no outputs")
    cos_dims = inits.get(cos) if cos else None
    return GraphInfo(name, {t.name: t for t in inputs if t.name not in inits}, {t.name: t for t in outputs},
                     cos_dims[0] if cos_dims else None, frozenset(external))


def _model(buf: memoryview, name: str) -> GraphInfo:
    for num, value in _fields(buf):
        if num == _MODEL_GRAPH:
            return _graph(_message(value), name)
    raise GraphFormatError("no graph in the file")


def read_graph(path: Path, name: str) -> GraphInfo:
    """Inputs, outputs, rotary length and external-data files of the ONNX model at `path`.

    The whole file is read: a bundle's model.onnx holds the graph and only tensors under 1 KiB
    (the weights are external data), so it is small. Raises GraphFormatError when the file is
    not an ONNX model, OSError when it cannot be read.
    """
    data = path.read_bytes()
    if not data:
        raise GraphFormatError("the file is empty")
    return _model(memoryview(data), name)
