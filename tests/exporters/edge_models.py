"""Edge formats of the test classifiers: the float ONNX file, its QDQ int8 quantization (calibrated on
scikit-image's photographs) and its float16 conversion, as an edge user would make them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: scikit-image's colour photographs (the demo's three first): calibration and heatmap images.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INPUT, LOGITS = "input", "logits"


def photo_pixels(size: int = 224) -> np.ndarray:
    """The photographs as uint8 RGB [N, size, size, 3] (resized, as `camrt explain` would)."""
    import cv2
    import skimage.data

    return np.stack([cv2.resize(getattr(skimage.data, name)(), (size, size), interpolation=cv2.INTER_AREA)
                     for name in PHOTOS])


def photo_batch(size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD, scale: float = 1 / 255) -> np.ndarray:
    """The photographs preprocessed to float32 NCHW: (pixel * scale - mean) / std."""
    pixels = photo_pixels(size).astype(np.float32) * scale
    return ((pixels - np.float32(mean)) / np.float32(std)).transpose(0, 3, 1, 2).astype(np.float32)


def export_float(model, path: Path, size: int = 224) -> Path:
    """The torch classifier as a float32 ONNX file with a dynamic batch (input "input", output "logits")."""
    import torch

    torch.onnx.export(model.eval(), torch.zeros(1, 3, size, size), str(path), input_names=[INPUT],
                      output_names=[LOGITS], dynamic_axes={INPUT: {0: "batch"}, LOGITS: {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def quantize_qdq(float_path: Path, path: Path, calibration: np.ndarray) -> Path:
    """onnxruntime's static QDQ quantization: int8 activations and per-channel int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Photos(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{INPUT: image[None]} for image in calibration])

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(float_path), str(path), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return path


def convert_float16(float_path: Path, path: Path) -> Path:
    """onnxconverter-common's float16 conversion, inputs and outputs included (keep_io_types=False)."""
    import onnx
    from onnxconverter_common import float16

    onnx.save(float16.convert_float_to_float16(onnx.load(str(float_path)), keep_io_types=False), str(path))
    return path
