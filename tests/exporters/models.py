"""The torch classifiers of the acceptance list, with a default-adjacent mid-network layer each."""

from __future__ import annotations

import numpy as np

from camrt import contract

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


def module_calls(model, names) -> list[str]:
    """The names of the modules `names`, one per call, in call order, in a forward pass of a zero image."""
    import torch

    events: list[str] = []
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, a, o, name=n: events.append(name))
             for n in dict.fromkeys(names)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
    finally:
        for hook in hooks:
            hook.remove()
    return events


def switch_layers(model, after: str | None = None) -> list[str]:
    """Every call of a ReLU or ReLU6 module that runs after module `after` returns (all calls when
    `after` is None), in call order, as export layer names ("name", or "name@k" for the k-th call of
    a module called several times)."""
    import torch

    watched = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.ReLU, torch.nn.ReLU6))]
    events = module_calls(model, [*watched, *([after] if after else [])])
    counts = {n: events.count(n) for n in watched}
    seen: dict[str, int] = {}
    labelled = []
    for name in events:
        k = seen.get(name, 0)
        seen[name] = k + 1
        labelled.append((name, name if counts.get(name, 1) == 1 else f"{name}@{k}"))
    start = max((i + 1 for i, (name, _) in enumerate(labelled) if name == after), default=0)
    return [label for name, label in labelled[start:] if name in counts]


def switch_states(outputs) -> np.ndarray:
    """The switch of each ReLU/ReLU6 output element: off (== 0), saturated (== 6, ReLU6) or passing."""
    return np.concatenate([np.stack([o == 0, o == 6]).ravel() for o in outputs])


def switch_flips(model, model64, x, after: str | None = None, **export_options) -> tuple[int, int]:
    """How many ReLU/ReLU6 switch states downstream of module `after` (all when None) differ from
    torch float64's, in onnxruntime's (the file exported with `export_options`) and in torch
    float32's forward pass on input x."""
    import numpy as np
    import torch

    from camrt_exporters.export import export_torch
    from camrt_exporters.torch_frontend import parse_layer, reference_gradients
    from camrt_exporters.validate import run_contract

    layers = switch_layers(model, after)
    onnx_model, _ = export_torch(model, layers=layers, rules=[contract.RULE_VANILLA], **export_options)
    got = run_contract(onnx_model, onnx_model.graph.input[0].name, x, np.full(len(x), contract.TOP1_TARGET))
    targets = torch.from_numpy(got[contract.TARGET_INDEX_OUTPUT])
    ours = switch_states([got[contract.activation_output(layer)] for layer in layers])
    torch32 = switch_states(reference_gradients(model, [parse_layer(model, n) for n in layers],
                                                torch.from_numpy(x), targets)["acts"])
    truth = switch_states(reference_gradients(model64, [parse_layer(model64, n) for n in layers],
                                              torch.from_numpy(x).double(), targets)["acts"])
    return int((ours != truth).sum()), int((torch32 != truth).sum())


def photos(size: int = 224):
    """chelsea, coffee, astronaut at size x size, EfficientNet-Lite's (x - 127) / 128, NCHW float32."""
    import cv2
    import numpy as np
    import skimage.data

    images = [cv2.resize(getattr(skimage.data, n)(), (size, size), interpolation=cv2.INTER_AREA)
              for n in ("chelsea", "coffee", "astronaut")]
    return ((np.stack(images).astype(np.float32) - 127.0) / 128.0).transpose(0, 3, 1, 2).copy()
