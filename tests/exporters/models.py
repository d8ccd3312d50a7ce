"""The torch classifiers of the acceptance list, with a default-adjacent mid-network layer each."""

from __future__ import annotations

#: (factory spec, a mid-network layer)
ARCHITECTURES = {
    "resnet18": ("torchvision.models:resnet18", "layer3"),
    "resnet50": ("torchvision.models:resnet50", "layer3"),
    "vgg16_bn": ("torchvision.models:vgg16_bn", "features.32"),
    "densenet121": ("torchvision.models:densenet121", "features.denseblock3"),
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", "features.10"),
    "mobilenet_v3_large": ("torchvision.models:mobilenet_v3_large", "features.10"),
    "efficientnet_b0": ("torchvision.models:efficientnet_b0", "features.5"),
    "regnet_y_400mf": ("torchvision.models:regnet_y_400mf", "trunk_output.block3"),
    "shufflenet_v2_x1_0": ("torchvision.models:shufflenet_v2_x1_0", "stage3"),
    "squeezenet1_1": ("torchvision.models:squeezenet1_1", "features.9"),
    "googlenet": ("torchvision.models:googlenet", "inception4c"),
    "convnext_tiny": ("torchvision.models:convnext_tiny", "features.5"),
    "efficientnet_lite0": ("camrt_exporters.zoo:efficientnet_lite0", "_blocks.10"),
}


def load(name: str):
    """The model with fixed random weights (seed 0), or real weights for EfficientNet-Lite0."""
    import torch

    from camrt_exporters.torch_frontend import load_model

    torch.manual_seed(0)
    return load_model(ARCHITECTURES[name][0])
