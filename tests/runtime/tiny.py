"""Tiny camrt contract files built with the exporter's contract builder.

The model is Conv(3x3, stride 2, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax,
weights as initializers. `numpy_forward` is an independent numpy implementation of it: the oracle
for logits, targets and the CAM closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from camrt import contract

HEIGHT, WIDTH = 12, 16
CHANNELS, CLASSES = 4, 5
LABELS = [f"class-{i}" for i in range(CLASSES)]


@dataclass
class TinyModel:
    path: str
    w1: np.ndarray  # [K, 3, 3, 3]
    b1: np.ndarray  # [K]
    w2: np.ndarray  # [classes, K]
    b2: np.ndarray  # [classes]
    preprocessing: contract.Preprocessing


def numpy_forward(model: TinyModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny model in float64 numpy: conv (pre-ReLU), feat (post-ReLU), logits."""
    x = x.astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    conv = np.einsum("nchwij,kcij->nkhw", windows, model.w1.astype(np.float64)) + model.b1[None, :, None, None]
    feat = np.maximum(conv, 0)
    logits = feat.mean(axis=(2, 3)) @ model.w2.T.astype(np.float64) + model.b2
    return {"conv": conv, "feat": feat, "logits": logits}


def tiny_onnx(seed: int = 0, batch: int | str = "N"):
    """The plain ONNX classifier (no camrt contract) and its weights (w1, b1, w2, b2)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (CHANNELS, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, CHANNELS).astype(np.float32)
    w2 = rng.normal(0, 1.0, (CLASSES, CHANNELS)).astype(np.float32)
    b2 = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["conv"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2],
                         kernel_shape=[3, 3]),
        helper.make_node("Relu", ["conv"], ["feat"], name="relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, CLASSES])],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), (w1, b1, w2, b2)


def build_tiny_model(
    path: str,
    *,
    seed: int = 0,
    batch: int | str = "N",
    layers: tuple[str, ...] = ("feat", "conv"),
    rule_sets: tuple[str, ...] = ("vanilla", "guided"),
    labels: list[str] | None = LABELS,
    preprocessing: contract.Preprocessing | None = None,
    metadata_overrides: dict[str, str | None] | None = None,
    fullgrad: bool = False,
) -> TinyModel:
    import onnx

    from camrt_exporters.autodiff.graph import GraphIndex
    from camrt_exporters.autodiff.rules import BUILTIN_RULE_SETS, VANILLA
    from camrt_exporters.contract_file import build_contract_model, choose_score, contract_metadata, prepare

    plain, (w1, b1, w2, b2) = tiny_onnx(seed, batch)
    model = prepare(plain)
    index = GraphIndex(model)
    score = choose_score(index, "probs")
    preprocessing = preprocessing or contract.Preprocessing(HEIGHT, WIDTH)
    chosen = {rule_set.name: rule_set for rule_set in BUILTIN_RULE_SETS}
    meta = contract_metadata(
        layers=list(layers), default=layers[0] if layers else None, preprocessing=preprocessing,
        rule_sets=list(rule_sets), labels=labels, source={"framework": "onnx", "model": "tiny"},
        score=score, image_input="image", exporter_version="test",
    )
    for key, value in (metadata_overrides or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    built = build_contract_model(
        model, image_input="image", score=score, layers={name: name for name in layers},
        input_rule_sets=[chosen[r] for r in rule_sets], vanilla=VANILLA, metadata=meta, keep_outputs=["probs"],
        fullgrad=fullgrad,
    )
    onnx.save(built, path)
    return TinyModel(path, w1, b1, w2, b2, preprocessing)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random RGB image (so JPEG round trips keep it recognisable)."""
    base = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    import cv2

    return cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)


def write_image(path: str, rgb: np.ndarray) -> str:
    import cv2

    ok = cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, path
    return path
