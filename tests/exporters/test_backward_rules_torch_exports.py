"""The resampling and data-moving rules on graphs as torch's exporters (dynamo=False, opset 17, and
dynamo=True, opset 18) write them with a dynamic batch: a tiny network per construct (ViT's class
token, F.interpolate, ConvTranspose, pixel shuffles, einsum, strided and flipped slices, repeat) is
exported, its input gradient built by `differentiate` and run in onnxruntime, and compared with
torch autograd in float64 at batch 1 and 3. The legacy exports are the ones whose shape inference
loses the token count that Concat's rule once required."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from camrt_exporters.autodiff.graph import GraphIndex
from camrt_exporters.autodiff.reverse import ForwardPatches, differentiate
from camrt_exporters.autodiff.rules import VANILLA

CLASSES = 5


class ClassToken(nn.Module):
    """ViT/DeiT: patches, a class token concatenated in front, x[:, 0] and the sum of x[:, 1:]."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 17, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = self.norm(torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos)
        return self.head(torch.cat([tokens[:, 0], tokens[:, 1:].sum(1)], dim=1))


class Interpolations(nn.Module):
    """F.interpolate by size and by scale factor, in the modes torch exports to Resize."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(4))
        self.head = nn.Linear(3, CLASSES)

    def forward(self, x):
        x = F.interpolate(torch.tanh(self.convs[0](x)), size=(11, 7), mode="bilinear", align_corners=False)
        x = F.interpolate(torch.tanh(self.convs[1](x)), scale_factor=2, mode="nearest")
        x = F.interpolate(torch.tanh(self.convs[2](x)), size=(9, 9), mode="bicubic", align_corners=True)
        x = F.interpolate(torch.tanh(self.convs[3](x)), scale_factor=0.5, mode="bilinear", align_corners=True)
        return self.head(x.mean((2, 3)))


class TransposedConvolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up1d = nn.ConvTranspose1d(6, 4, 2, stride=3, dilation=2)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, x):
        x = torch.tanh(self.up(x.repeat(1, 2, 1, 1)[:, :4]))
        return self.head(torch.tanh(self.up1d(x.mean(3))).mean(2))


class Shuffles(nn.Module):
    """pixel_unshuffle/pixel_shuffle, einsum, a strided slice, a flip, repeat."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(12, 12))
        self.head = nn.Parameter(torch.randn(3, CLASSES))

    def forward(self, x):
        x = F.pixel_unshuffle(x, 2)
        x = torch.tanh(torch.einsum("bchw,cd->bdhw", x, self.mix))
        x = F.pixel_shuffle(x, 2)[:, :, ::2, 1::3]
        x = torch.flip(x, [3]).repeat(1, 1, 2, 1) * torch.linspace(0, 1, 5)
        return torch.einsum("bchw,ck->bk", x, self.head)


def export(model: nn.Module, dynamo: bool) -> onnx.ModelProto:
    """The model with input "X" of dynamic batch and output "Y" (plus an input "G", the cotangent)."""
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            graph = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, input_names=["X"], output_names=["Y"],
                                      dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=64)}}).model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["X"],
                              output_names=["Y"], dynamic_axes={"X": {0: "N"}, "Y": {0: "N"}})
            graph = onnx.load_from_string(buffer.getvalue())
    for i, node in enumerate(graph.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    graph.graph.input.append(helper.make_tensor_value_info("G", TensorProto.FLOAT, ["N", CLASSES]))
    return graph


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("network", [ClassToken, Interpolations, TransposedConvolutions, Shuffles])
def test_input_gradient_of_an_export_with_dynamic_batch(network, dynamo):
    torch.manual_seed(0)
    model = network().eval()
    graph = export(model, dynamo)
    patches = ForwardPatches()
    backward = differentiate(GraphIndex(graph), "Y", "G", ["X"], VANILLA, patches, "bwd")
    nodes = [patches.apply(n) for n in graph.graph.node]
    del graph.graph.node[:]
    graph.graph.node.extend(nodes + backward.nodes)
    graph.graph.initializer.extend(backward.initializers)
    graph.graph.output.append(helper.make_tensor_value_info(backward.gradients["X"], TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    model64 = model.double()
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 16, 16))
        g = rng.standard_normal((batch, CLASSES))
        (dx,) = session.run([backward.gradients["X"]], {"X": x.astype(np.float32), "G": g.astype(np.float32)})
        xt = torch.tensor(x, requires_grad=True)
        (model64(xt) * torch.tensor(g)).sum().backward()
        want = xt.grad.numpy()
        np.testing.assert_allclose(dx, want, rtol=0, atol=1e-4 * np.abs(want).max())
