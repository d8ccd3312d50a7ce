"""Helpers shared by the whole test suite (the fixtures live in tests/conftest.py).

The tiny model is Conv(3x3, stride 2, pad 1) -> Relu -> GlobalAveragePool -> Flatten -> Gemm ->
Softmax, weights as initializers. Its camrt files are checked in (tests/fixtures/golden/, made by
tests/fixtures/make_golden.py with the exporter), so the runtime's tests need neither torch nor
camrt-exporters. `numpy_forward` is an independent numpy implementation of it: the oracle for
logits, targets and the CAM closed form; the golden files' .npz hold torch autograd's numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from camrt import contract
from camrt.testing import TINY_FOLDER

HEIGHT, WIDTH = 12, 16
CHANNELS, CLASSES = 4, 5
LABELS = [f"class-{i}" for i in range(CLASSES)]
WEIGHTS_SEED = 0

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


@dataclass(frozen=True)
class GoldenVariant:
    """One checked-in tiny camrt file: the exporter options it was built with."""

    batch: int | str = "N"
    layers: tuple[str, ...] = ("feat", "conv")
    rule_sets: tuple[str, ...] = ("vanilla", "guided")
    fullgrad: bool = False
    #: Whether torch's numbers for its outputs are stored next to it (`<name>.npz`).
    references: bool = False
    folder: Path = GOLDEN
    file_name: str | None = None  # default: the options, e.g. tiny-feat+conv-vanilla+guided

    @property
    def name(self) -> str:
        if self.file_name:
            return self.file_name
        parts = ["tiny", "+".join(self.layers) or "no-layers", "+".join(self.rule_sets) or "no-rules"]
        return "-".join(parts + ["fullgrad"] * self.fullgrad + [f"batch{self.batch}"] * (self.batch != "N"))

    @property
    def path(self) -> Path:
        return self.folder / f"{self.name}.camrt.onnx"

    @property
    def reference_path(self) -> Path:
        """torch's numbers for the file's outputs on fixed inputs (see make_golden.py)."""
        return self.folder / f"{self.name}.npz"


GOLDEN_VARIANTS = (
    # The files the runtime's tests are built around, with torch's numbers.
    GoldenVariant(references=True),
    GoldenVariant(fullgrad=True, references=True),
    GoldenVariant(batch=2, references=True),
    GoldenVariant(rule_sets=("guided",), references=True),
    GoldenVariant(rule_sets=("vanilla",), references=True),
    GoldenVariant(layers=(), rule_sets=("vanilla",), references=True),
    GoldenVariant(layers=(), rule_sets=(), references=True),
    # camrt.testing's file, shipped as package data: every output the tiny model can carry.
    GoldenVariant(rule_sets=("vanilla", "guided", "deconvnet"), fullgrad=True, references=True, folder=TINY_FOLDER,
                  file_name="tiny"),
    # What tests/runtime/test_plan.py's files become when re-exported with the flags a refusal names.
    *(GoldenVariant(layers=layers, rule_sets=rule_sets, fullgrad=fullgrad) for layers, rule_sets, fullgrad in (
        (("conv", "feat"), ("vanilla", "guided"), False),
        (("conv",), (), False),
        (("conv",), ("vanilla",), False),
        (("conv",), ("vanilla",), True),
        (("conv",), ("guided",), False),
        (("conv",), ("deconvnet",), False),
        (("conv",), ("vanilla", "guided"), False),
        (("feat",), ("vanilla",), False),
        (("feat",), ("vanilla", "guided"), False),
        ((), ("vanilla",), True),
        ((), ("vanilla", "guided"), False),
        ((), ("vanilla", "deconvnet"), False),
        (("feat", "conv"), ("deconvnet",), False),
        (("feat", "conv"), ("deconvnet", "guided"), False),
        (("feat", "conv"), ("deconvnet", "vanilla"), False),
        (("feat", "conv"), ("deconvnet", "vanilla"), True),
        (("feat", "conv"), ("guided", "deconvnet"), False),
        (("feat", "conv"), ("guided", "vanilla"), False),
        (("feat", "conv"), ("guided", "vanilla"), True),
        (("feat", "conv"), ("vanilla", "guided", "deconvnet"), False),
    )),
)


def golden_variant(*, batch: int | str = "N", layers: tuple[str, ...] = ("feat", "conv"),
                   rule_sets: tuple[str, ...] = ("vanilla", "guided"), fullgrad: bool = False) -> GoldenVariant:
    wanted = (batch, tuple(layers), tuple(rule_sets), fullgrad)
    for variant in GOLDEN_VARIANTS:
        if (variant.batch, variant.layers, variant.rule_sets, variant.fullgrad) == wanted:
            return variant
    raise LookupError(f"no golden tiny file with batch={batch!r} layers={layers} rule_sets={rule_sets} "
                      f"fullgrad={fullgrad}: add it to GOLDEN_VARIANTS (tests/helpers.py) and run "
                      "`python -m tests.fixtures.make_golden`")


@dataclass
class TinyModel:
    path: str
    w1: np.ndarray  # [K, 3, 3, 3]
    b1: np.ndarray  # [K]
    w2: np.ndarray  # [classes, K]
    b2: np.ndarray  # [classes]
    preprocessing: contract.Preprocessing


def tiny_weights(seed: int = WEIGHTS_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The tiny model's weights (w1, b1, w2, b2)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (CHANNELS, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, CHANNELS).astype(np.float32)
    w2 = rng.normal(0, 1.0, (CLASSES, CHANNELS)).astype(np.float32)
    b2 = rng.normal(0, 0.1, CLASSES).astype(np.float32)
    return w1, b1, w2, b2


def tiny_onnx(seed: int = WEIGHTS_SEED, batch: int | str = "N"):
    """The plain ONNX classifier (no camrt contract) and its weights (w1, b1, w2, b2)."""
    from onnx import TensorProto, helper, numpy_helper

    w1, b1, w2, b2 = tiny_weights(seed)
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


def load_tiny(path: str, preprocessing: contract.Preprocessing | None = None) -> TinyModel:
    """A tiny camrt file with its weights, read back from the file itself."""
    weights = initializers(path)
    return TinyModel(str(path), weights["w1"], weights["b1"], weights["w2"], weights["b2"],
                     preprocessing or contract.Preprocessing(HEIGHT, WIDTH))


def copy_golden(variant: GoldenVariant, path: Path, *, labels: list[str] | None = LABELS,
                preprocessing: contract.Preprocessing | None = None,
                metadata_overrides: dict[str, str | None] | None = None) -> TinyModel:
    """A copy of a golden file at `path`, its metadata edited as the exporter would have written it
    with these options (None in `metadata_overrides` removes the key)."""
    edits: dict[str, str | None] = {}
    if labels != LABELS:
        edits[contract.META_LABELS] = json.dumps(list(labels)) if labels else None
    if preprocessing is not None:
        edits[contract.META_PREPROCESSING] = preprocessing.to_json()
    edits.update(metadata_overrides or {})
    if not edits:
        shutil.copyfile(variant.path, path)
        return load_tiny(str(path), preprocessing)
    import onnx

    model = onnx.load(str(variant.path))
    meta = {p.key: p.value for p in model.metadata_props}
    for key, value in edits.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))
    return load_tiny(str(path), preprocessing)


def numpy_forward(model: TinyModel, x: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny model in float64 numpy: conv (pre-ReLU), feat (post-ReLU), logits."""
    x = x.astype(np.float64)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))[:, :, ::2, ::2]
    conv = np.einsum("nchwij,kcij->nkhw", windows, model.w1.astype(np.float64)) + model.b1[None, :, None, None]
    feat = np.maximum(conv, 0)
    logits = feat.mean(axis=(2, 3)) @ model.w2.T.astype(np.float64) + model.b2
    return {"conv": conv, "feat": feat, "logits": logits}


# --- the metrics tests' toy models (tests/runtime/test_metrics.py) ----------------------------
TOY_HEIGHT, TOY_WIDTH = 6, 8


def _toy_onnx(nodes, initializers: dict[str, np.ndarray]):
    """A classifier graph with input `image` [1, 3, 6, 8] and output `logits`."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, TOY_HEIGHT, TOY_WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(value, name) for name, value in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def linear_onnx(weights: np.ndarray, bias: np.ndarray):
    """logits = weights @ flatten(image) + bias (weights [classes, 3*H*W]); layer: the image times one."""
    from onnx import helper

    nodes = [helper.make_node("Mul", ["image", "one"], ["pixels"]),
             helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)]
    return _toy_onnx(nodes, {"one": np.ones(1, np.float32), "w": weights, "b": bias})


def conv_matmul_onnx():
    """Conv 3x3 stride 1 -> Sigmoid (smooth: finite differences apply) -> GlobalAveragePool -> Flatten -> MatMul + Add:
    both the Conv and the MatMul get backward constants derived from their weights (flipped kernel, transposed matrix)."""
    from onnx import helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["image", "cw", "cb"], ["conv"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Sigmoid", ["conv"], ["feat"]),
             helper.make_node("GlobalAveragePool", ["feat"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "fw"], ["mm"]),
             helper.make_node("Add", ["mm", "fb"], ["logits"])]
    weights = {"cw": rng.normal(0, 0.5, (6, 3, 3, 3)).astype(np.float32), "cb": rng.normal(0, 0.1, 6).astype(np.float32),
               "fw": rng.normal(0, 1, (6, 4)).astype(np.float32), "fb": rng.normal(0, 0.1, 4).astype(np.float32)}
    return _toy_onnx(nodes, weights)


def toy_sources() -> dict:
    """name -> (plain ONNX model, layers): golden camrt files made from them with `camrt export`'s ONNX
    front end (vanilla rules)."""
    n = 3 * TOY_HEIGHT * TOY_WIDTH
    rng = np.random.default_rng(0)
    linear = rng.normal(size=(3, n)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    return {
        # logit = the mean of the pixels (two identical classes)
        "toy-mean": (linear_onnx(np.full((2, n), 1 / n, np.float32), np.zeros(2, np.float32)), ["pixels"]),
        "toy-linear": (linear_onnx(*linear), ["pixels"]),
        "toy-convmm": (conv_matmul_onnx(), ["feat"]),
    }


def toy_model(name: str, folder: Path) -> str:
    """A copy of the golden toy camrt file `name` (a key of toy_sources()) in `folder`."""
    path = folder / f"{name}.camrt.onnx"
    shutil.copyfile(GOLDEN / f"{name}.camrt.onnx", path)
    return str(path)


def initializers(path: str) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth-ish random RGB image (so JPEG round trips keep it recognisable)."""
    import cv2

    base = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    return cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)


def write_image(path: str, rgb: np.ndarray) -> str:
    import cv2

    ok = cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok, path
    return path


def write_plugin_modules(folder, modules: dict[str, str], monkeypatch) -> None:
    """Write `modules` (name -> source) into `folder`, put it first on sys.path, forget earlier
    imports of those names, and give camrt.plugins a fresh failure record for the test."""
    from camrt import plugins

    folder.mkdir()
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(plugins, "load_failures", {})  # the module global, not the process's record


def imagenet_photos(size: int) -> np.ndarray:
    """scikit-image's chelsea and coffee at size x size, normalised with ImageNet's mean and std: [2, 3, size, size]."""
    import cv2
    import skimage.data

    images = [cv2.resize(getattr(skimage.data, name)(), (size, size), interpolation=cv2.INTER_AREA)
              for name in ("chelsea", "coffee")]
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(0, 3, 1, 2).copy()


def count_runs(session_object) -> list[int]:
    """Wrap an onnxruntime session's run to count its calls (one entry per call)."""
    calls = []
    original = session_object.run

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    session_object.run = counting
    return calls
