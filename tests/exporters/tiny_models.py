"""Small ONNX classifiers built with onnx.helper (not from torch), with weights as Constant nodes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "conv_b": rng.standard_normal(8).astype(np.float32) * 0.1,
        "fc_w": rng.standard_normal((5, 8)).astype(np.float32),
        "fc_b": rng.standard_normal(5).astype(np.float32) * 0.1,
    }


def conv_relu_maxpool_gap_gemm_softmax(batch: int | str = 1, seed: int = 0, extra_nodes=()) -> onnx.ModelProto:
    """image [B,3,16,16] -> Conv(3x3, pad 1) -> Relu -> MaxPool(2) -> GAP -> Flatten -> Gemm -> Softmax."""
    w = weights(seed)
    constants = [
        helper.make_node("Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(value, name))
        for name, value in w.items()
    ]
    nodes = [
        *constants,
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("MaxPool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["pool"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
        *extra_nodes,
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 5])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def torch_equivalent(seed: int = 0):
    """The same network in torch, for an autograd oracle."""
    import torch

    w = weights(seed)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    fc = torch.nn.Linear(8, 5)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w["conv_w"]))
        conv.bias.copy_(torch.from_numpy(w["conv_b"]))
        fc.weight.copy_(torch.from_numpy(w["fc_w"]))
        fc.bias.copy_(torch.from_numpy(w["fc_b"]))

    def forward(x):
        relu = torch.relu(conv(x))
        pooled = torch.nn.functional.max_pool2d(relu, 2)
        return relu, pooled, fc(pooled.mean(dim=(2, 3)))

    return forward
