"""Env snapshots as JSON-safe strings: what a StepRecord stores so PPO's reward can replay from that state.

No pickle: arrays, bytes, tuples and the games' own snapshot dataclasses are encoded explicitly, and
decoding only ever builds those types, so a segment file can never run code when it is read.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import zlib
from typing import Any

import numpy as np

from ..games.base import TimeStep
from ..games.jericho_env import JerichoState

PREFIX = "pzs1:"  # format tag, so a future layout can be told apart
_DATACLASSES = {cls.__name__: cls for cls in (JerichoState, TimeStep)}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return {"nd": _b64(np.ascontiguousarray(value).tobytes()), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"bytes": _b64(value)}
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("env state dicts need string keys")
        return {"dict": {k: _to_json(v) for k, v in value.items()}}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        fields = {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": fields}
    raise TypeError(f"cannot encode {type(value).__name__} in an env state")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "nd" in value:
        data = base64.b64decode(value["nd"])
        return np.frombuffer(data, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if "bytes" in value:
        return base64.b64decode(value["bytes"])
    if "tuple" in value:
        return tuple(_from_json(v) for v in value["tuple"])
    if "dict" in value:
        return {k: _from_json(v) for k, v in value["dict"].items()}
    if "dataclass" in value:
        cls = _DATACLASSES.get(value["dataclass"])
        if cls is None:
            raise ValueError(f"unknown snapshot type {value['dataclass']!r}")
        return cls(**{k: _from_json(v) for k, v in value["fields"].items()})
    raise ValueError(f"malformed env state entry with keys {sorted(value)}")


def state_bytes(state: Any) -> bytes:
    """`GameEnv.get_state()` as canonical JSON bytes, uncompressed (snapshots of one game share most of them)."""
    return json.dumps(_to_json(state), separators=(",", ":")).encode()


def state_from_bytes(data: bytes) -> Any:
    """The snapshot `state_bytes` wrote."""
    return _from_json(json.loads(data))


def encode_state(state: Any) -> str:
    """`GameEnv.get_state()` as a compact ASCII string."""
    return PREFIX + _b64(zlib.compress(state_bytes(state), 6))


def decode_state(text: str) -> Any:
    """The snapshot `encode_state` wrote, ready for `GameEnv.set_state`."""
    if not text.startswith(PREFIX):
        raise ValueError(f"not an encoded env state (expected the {PREFIX!r} prefix)")
    return state_from_bytes(zlib.decompress(base64.b64decode(text[len(PREFIX):])))
