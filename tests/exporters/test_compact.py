"""`camrt export --compact`: input gradients through ConvTranspose on the model's own weights.

Oracle: the default file's flipped-kernel Conv gradients (themselves checked by the export's finite
differences and tests/exporters/test_backward_rules*.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from camrt import contract
from camrt_exporters.export import export_onnx

from .tiny_models import conv_relu_maxpool_gap_gemm_softmax, weights


def test_compact_export_shares_the_conv_weights(tmp_path):
    """--compact: the input gradients of a stride-1 Conv through ConvTranspose on the model's own weights equal
    the flipped-kernel copy's (vanilla and guided, to float32 round-off; both files pass the self-check), and
    the file stores no copy: the flipped-kernel file carries the 8x3x3x3 kernel once per rule set more."""
    path = tmp_path / "tiny.onnx"
    onnx.save(conv_relu_maxpool_gap_gemm_softmax(batch="N"), str(path))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    outputs, sizes = {}, {}
    for compact in (False, True):
        exported, _ = export_onnx(path, rules=("vanilla", "guided"), compact=compact)
        sizes[compact] = sum(numpy_helper.to_array(i).size for i in exported.graph.initializer)
        names = [contract.input_gradient_output(r) for r in ("vanilla", "guided")]
        session = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs[compact] = session.run(names, {"image": x, contract.TARGET_INPUT: np.array([-1, 2], np.int64)})
    for flipped, shared in zip(outputs[False], outputs[True]):
        np.testing.assert_allclose(shared, flipped, rtol=1e-5, atol=1e-6 * np.abs(flipped).max())
    assert sizes[False] - sizes[True] == 2 * weights()["conv_w"].size
