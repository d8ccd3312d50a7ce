"""The float types at a contract file's boundary: camrt feeds each input in the type the graph
declares (float16 images for files exported from float16 models, float32 otherwise) and hands every
float16 output on as float32, so the methods and postprocessing see one type."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: ONNX TensorProto element types of the image inputs camrt feeds (FLOAT, FLOAT16); numbers, not onnx
#: imports, so that `import camrt` stays fast.
IMAGE_TYPES = {1: "float32", 10: "float16"}
_SESSION_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def in_session_types(session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds` with each float array cast to the type the onnxruntime `session` declares for it."""
    declared = {i.name: _SESSION_FLOATS.get(i.type) for i in session.get_inputs()}
    return {name: value.astype(declared[name]) if declared.get(name) and value.dtype.kind == "f"
            and value.dtype != declared[name] else value for name, value in feeds.items()}


def as_float32(values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """`values` with float16 arrays widened to float32."""
    return [value.astype(np.float32) if value.dtype == np.float16 else value for value in values]
