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
    """The model with fixed random weights (seed 0), or real weights for EfficientNet-Lite0.

    Random-init BatchNorm statistics (mean 0, var 1) leave some networks (googlenet's std-0.01
    init) with activations near 0 deep inside, where float32 ReLU/MaxPool switches tie at exact
    zeros; the statistics are calibrated on random images first, as training would.
    """
    import torch

    from camrt_exporters.torch_frontend import load_model

    torch.manual_seed(0)
    model = load_model(ARCHITECTURES[name][0])
    if name != "efficientnet_lite0":
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for _ in range(2):
                model(torch.randn(4, 3, 224, 224))
        model.eval()
    return model
