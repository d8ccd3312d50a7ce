"""Vision transformers: camrt's maps equal pytorch-grad-cam 1.5.7's with its `reshape_transform`.

timm's vit_tiny_patch16_224 (a class token), deit_tiny_distilled_patch16_224 (class and
distillation tokens) and swin_tiny_patch4_window7_224 (channels-last stages), random weights
(seed 0), at a reduced input size (timm's img_size; Swin with window_size 4) to keep the test
fast; one photograph (chelsea). Each model is exported once with its default layer, which the
exporter must find (ViT/DeiT: the last block's norm1, a [B, T, C] token tensor; Swin: the final
norm, a [B, h, w, C] channels-last tensor) and record with the layout inferred from the graph; the
runtime folds it into [B, C, h, w]. The oracle runs pytorch-grad-cam on the torch model and the
same layer, given the reshape_transform its tutorials give (drop the extra tokens, fold the grid;
permute channels-last). Criterion: min-max maps within 1e-4.

- Score-CAM: pytorch-grad-cam upsamples its masks with align_corners=True, camrt (and the paper's
  code) at pixel centres, so it is compared with the paper's Algorithm 1 written in torch
  (tests/exporters/test_extra_pass_methods._scorecam_oracle) on the reshaped activations, over the
  32 channels of largest variance (camrt's top_channels) to keep the passes few.
- Ablation-CAM: pytorch-grad-cam's AblationLayerVit sets channel k of every token, the class token
  included, to min - 1e7 on signed layers; camrt zeroes the feature map A^k (the grid tokens' channel
  k), the paper's ablation of the map that is weighted. The reference is given an ablation layer
  doing the same.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from camrt import contract

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("timm")
pytest.importorskip("skimage")

#: camrt method -> pytorch-grad-cam class
GRADIENT_METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
}
#: name -> (timm kwargs, input size, expected default layer, its layout)
MODELS = {
    "vit_tiny_patch16_224": (dict(img_size=64), 64, "blocks.11.norm1",
                             contract.LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,))),
    "deit_tiny_distilled_patch16_224": (dict(img_size=64), 64, "blocks.11.norm1",
                                        contract.LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0, 1))),
    "swin_tiny_patch4_window7_224": (dict(img_size=128, window_size=4), 128, "norm",
                                     contract.LayerLayout(contract.LAYOUT_NHWC)),
}
TOLERANCE = 1e-4
#: method -> (bound against pytorch-grad-cam, bound against pytorch-grad-cam run on a float64 copy of
#: the model, both hard; why 1e-4 against pytorch-grad-cam is out of reach)
KNOWN = {"xgradcam": (1e-3, 5e-4, (
    "XGrad-CAM divides each channel's weight by sum_ab A^k_ab; a LayerNorm output is signed and centred, and "
    "on vit_tiny (random weights) some channel sums over the 4x4 grid cancel to 2.5e-4 of sum_ab |A^k_ab| "
    "(measured), so float32 rounding moves those weights far: pytorch-grad-cam's float32 map is itself 2.4e-4 "
    "from its float64 run, camrt's 2.4e-4 (measured; camrt vs pytorch-grad-cam 4.8e-4). Ill-conditioning of "
    "the method on this layer, not a formula difference (every other gradient method is within 1e-6)")),
    "ablationcam": (1e-3, 5e-4, (
        "Ablation-CAM's weights (y - y_k) / y difference two nearly equal scores (one of 192 channels of a "
        "LayerNorm output zeroed), so each framework's float32 rounding of the forward passes enters the "
        "weights magnified: on deit_tiny (random weights) pytorch-grad-cam's float32 map is 7.5e-5 from its "
        "float64 run and camrt's 1.7e-4 (camrt vs pytorch-grad-cam 1.6e-4, measured); vit_tiny 7.1e-5 and "
        "swin_tiny 5.1e-6 from pytorch-grad-cam"))}
SCORECAM_CHANNELS = 32


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


def reshape_transform(layout: contract.LayerLayout):
    """pytorch-grad-cam's reshape_transform for `layout` (its ViT/DeiT and Swin tutorials)."""
    def tokens(tensor):
        h, w = layout.grid
        grid = tensor[:, len(layout.extra_tokens):, :]  # the tutorials' tensor[:, 1:, :] (DeiT: 2:)
        return grid.reshape(tensor.size(0), h, w, tensor.size(2)).permute(0, 3, 1, 2)

    def channels_last(tensor):
        return tensor.permute(0, 3, 1, 2)

    return tokens if layout.layout == contract.LAYOUT_TOKENS else channels_last


def make_model(name: str):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **MODELS[name][0]).eval()


def photo(size: int) -> np.ndarray:
    """chelsea at size x size, ImageNet-normalised, NCHW float32 [1, 3, size, size]."""
    import cv2
    import skimage.data

    image = cv2.resize(skimage.data.chelsea(), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    x = (image - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].copy()


#: A few minutes each on a 2-core machine (the export's torch validation, the reference's ablation passes).
SLOW_MODELS = ("deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224")


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name in SLOW_MODELS else name
                                        for name in MODELS])
def exported(request, tmp_path_factory):
    """(name, torch model, contract file, photo, target): exported with its default layer."""
    import torch

    from camrt_exporters.export import export_torch, write_model

    name = request.param
    model = make_model(name)
    size = MODELS[name][1]
    onnx_model, _ = export_torch(model, input_size=(size, size), rules=[contract.RULE_VANILLA])
    path = tmp_path_factory.mktemp("transformers") / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    x = photo(size)
    with torch.no_grad():
        target = int(model(torch.from_numpy(x)).argmax())
    return name, model, str(path), x, target


def test_default_layer_and_layout_are_recorded(exported):
    from camrt.modelfile.metadata import read_contract

    name, _, path, _, _ = exported
    info = read_contract(path)
    _, _, layer, layout = MODELS[name]
    assert info.default_layer == layer
    assert info.layer_layout(layer) == layout


def test_head_split_layer_is_refused_naming_the_flag():
    """The issue's stripes: timm ViT's old default, `attn.k_norm` [B, heads, T, head_dim], is refused
    at export (its layout cannot be established), naming --layout; a one-block ViT keeps it fast."""
    import timm
    import torch

    from camrt_exporters.errors import ExportError
    from camrt_exporters.export import export_torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=32,
                              num_heads=2).eval()
    with pytest.raises(ExportError, match=r"layer 'blocks.0.attn.k_norm' \[.*\]: cannot establish .* --layout"):
        export_torch(model, layers=["blocks.0.attn.k_norm"], input_size=(32, 32), rules=[contract.RULE_VANILLA])


def _module(model, layer):
    return dict(model.named_modules())[layer]


@pytest.mark.parametrize("method", list(GRADIENT_METHODS))
def test_gradient_method_matches_pytorch_grad_cam(request, exported, method):
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer

    name, model, path, x, target = exported
    explainer = Explainer(path, method=method)
    layer, layout = explainer.layers[0], explainer.info.layer_layout(explainer.layers[0])
    (result,) = explainer.explain(x, targets=[target])
    cam_class = getattr(pytorch_grad_cam, GRADIENT_METHODS[method])
    with cam_class(model=model, target_layers=[_module(model, layer)], reshape_transform=reshape_transform(layout)) as cam:
        reference = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(target)])[0]

    def float64_reference():
        float64 = copy.deepcopy(model).double()
        with cam_class(model=float64, target_layers=[_module(float64, layer)],
                       reshape_transform=reshape_transform(layout)) as cam:
            return cam(torch.from_numpy(x.astype(np.float64)), targets=[ClassifierOutputTarget(target)])[0]

    _compare(request, method, f"{name}/{layer}", result.heatmap, reference, float64_reference)


def _compare(request, method, where, ours, reference, float64_reference):
    """Min-max maps within TOLERANCE; for a KNOWN method beyond it, within its bounds against the
    reference and against the reference run in float64 (then an expected failure, with the reason)."""
    assert np.ptp(reference) > 0.5, f"{method} {where}: degenerate reference map"
    diff = float(np.abs(_minmax(ours) - _minmax(reference)).max())
    message = f"{method} on {where}: max diff {diff:.2e}"
    if method in KNOWN and diff > TOLERANCE:
        loose, truth_bound, reason = KNOWN[method]
        truth = float64_reference()
        ours_vs_truth = float(np.abs(_minmax(ours) - _minmax(truth)).max())
        theirs_vs_truth = float(np.abs(_minmax(reference) - _minmax(truth)).max())
        message += (f"; vs pytorch-grad-cam's float64 run: camrt {ours_vs_truth:.2e}, "
                    f"pytorch-grad-cam float32 {theirs_vs_truth:.2e}")
        print(message)
        assert diff <= loose and ours_vs_truth <= truth_bound, message
        request.applymarker(pytest.mark.xfail(strict=False, reason=reason))
    print(message)
    assert diff <= TOLERANCE, message


def test_scorecam_matches_paper_formula(exported):
    from camrt import Explainer

    from .test_extra_pass_methods import _scorecam_oracle

    name, model, path, x, target = exported
    explainer = Explainer(path, method="scorecam", top_channels=SCORECAM_CHANNELS, batch_size=32)
    layer = explainer.layers[0]
    (result,) = explainer.explain(x, targets=[target])
    reference = _scorecam_oracle(model, _module(model, layer), x, [target], top=SCORECAM_CHANNELS,
                                 reshape=reshape_transform(explainer.info.layer_layout(layer)))[0]
    assert np.ptp(reference) > 0.5, f"scorecam {name}: degenerate reference map"
    diff = float(np.abs(_minmax(result.heatmap) - reference).max())
    print(f"scorecam on {name}/{layer}: max diff {diff:.2e}")
    assert diff <= TOLERANCE, f"scorecam on {name}/{layer}: max diff {diff:.2e}"


def map_zeroing_ablation_layer(layout: contract.LayerLayout):
    """pytorch-grad-cam's ablation layer for `layout` setting the feature map's channel k to 0:
    the grid tokens' channel k of a token tensor (AblationLayerVit's batch handling), channel k of
    a channels-last tensor."""
    from pytorch_grad_cam.ablation_layer import AblationLayerVit

    grid = np.array([p for p in range(len(layout.extra_tokens) + (layout.grid[0] * layout.grid[1] if layout.grid else 0))
                     if p not in layout.extra_tokens])

    class MapZeroingAblationLayer(AblationLayerVit):
        def set_next_batch(self, input_batch_index, activations, num_channels_to_ablate):
            self.activations = activations[input_batch_index].clone().unsqueeze(0).repeat(
                num_channels_to_ablate, *[1] * (activations.dim() - 1))

        def __call__(self, x, **kwargs):
            output = self.activations
            for i in range(output.size(0)):
                if layout.layout == contract.LAYOUT_TOKENS:
                    output[i, grid, self.indices[i]] = 0
                else:
                    output[i, ..., self.indices[i]] = 0
            return output

    return MapZeroingAblationLayer()


def test_ablationcam_matches_pytorch_grad_cam(request, exported):
    import torch
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer

    name, model, path, x, target = exported
    explainer = Explainer(path, method="ablationcam", batch_size=64)
    layer = explainer.layers[0]
    layout = explainer.info.layer_layout(layer)
    (result,) = explainer.explain(x, targets=[target])

    def ablation_cam(model, x):
        with AblationCAM(model=model, target_layers=[_module(model, layer)], batch_size=64,
                         reshape_transform=reshape_transform(layout),
                         ablation_layer=map_zeroing_ablation_layer(layout)) as cam:
            return cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(target)])[0]

    _compare(request, "ablationcam", f"{name}/{layer}", result.heatmap, ablation_cam(model, x),
             lambda: ablation_cam(copy.deepcopy(model).double(), x.astype(np.float64)))


# --- the ONNX front end: a plain ONNX file of the same model (torch.onnx.export, TorchScript) ---------
@pytest.fixture(scope="module", params=[
    "vit_tiny_patch16_224",
    pytest.param("swin_tiny_patch4_window7_224", marks=pytest.mark.slow),  # ~3 min of finite differences
])
def exported_from_onnx(request, tmp_path_factory):
    """(name, torch model, contract file of its plain ONNX export, photo, target)."""
    import warnings

    import torch

    from camrt_exporters.export import export_onnx, write_model

    name = request.param
    model = make_model(name)
    size = MODELS[name][1]
    folder = tmp_path_factory.mktemp("plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(folder / "plain.onnx"), dynamo=False,
                          input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx_model, _ = export_onnx(folder / "plain.onnx", rules=[contract.RULE_VANILLA])
    write_model(onnx_model, folder / "plain.camrt.onnx")
    x = photo(size)
    with torch.no_grad():
        target = int(model(torch.from_numpy(x)).argmax())
    return name, model, str(folder / "plain.camrt.onnx"), x, target


def test_onnx_front_end_default_layer_gives_pytorch_grad_cams_map(request, exported_from_onnx):
    """The default layer of the plain file is a tensor name (ViT: the LayerNormalization feeding the
    last attention; Swin: the final LayerNormalization, channels-last) with the torch default's
    layout, and its Grad-CAM is pytorch-grad-cam's at the torch module."""
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer

    name, model, path, x, target = exported_from_onnx
    _, _, torch_layer, layout = MODELS[name]
    explainer = Explainer(path, method="gradcam")
    assert explainer.info.layer_layout(explainer.layers[0]) == layout
    (result,) = explainer.explain(x, targets=[target])
    with GradCAM(model=model, target_layers=[_module(model, torch_layer)], reshape_transform=reshape_transform(layout)) as cam:
        reference = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(target)])[0]
    _compare(request, "gradcam", f"{name} (ONNX front end) {explainer.layers[0]}", result.heatmap, reference, None)


#: name -> the tensor of the plain ONNX file that is the torch default layer's output
ONNX_DEFAULTS = {"vit_tiny_patch16_224": "/blocks/blocks.11/norm1/LayerNormalization_output_0",
                 "swin_tiny_patch4_window7_224": "/norm/LayerNormalization_output_0"}


def test_inspect_of_the_plain_file_lists_the_default_and_layout_export_chooses(exported_from_onnx):
    """`camrt inspect plain.onnx` (the runtime alone: camrt.modelfile) shows as its default the tensor
    `camrt export` chose, with the layout stored in the file, which is the torch default's layout."""
    from pathlib import Path

    from camrt import Explainer
    from camrt.cli.inspect import onnx_summary

    name, _, path, _, _ = exported_from_onnx
    summary = onnx_summary(str(Path(path).with_name("plain.onnx")))
    info = Explainer(path, method="gradcam").info
    layouts = {c["layer"]: c["layout"] for c in summary["candidates"]}
    assert summary["default_layer"] == info.default_layer == ONNX_DEFAULTS[name]
    assert contract.LayerLayout.from_dict(layouts[summary["default_layer"]]) == info.layer_layout(info.default_layer) \
        == MODELS[name][3]


# --- torchvision ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size, layer, layout", [
    ("vit_b_16", dict(image_size=64), 64, "encoder.layers.encoder_layer_11.ln_1",
     contract.LayerLayout(contract.LAYOUT_TOKENS, (4, 4), (0,))),
    ("swin_t", {}, 224, "norm", contract.LayerLayout(contract.LAYOUT_NHWC)),
])
def test_torchvision_transformer_gradcam_matches_pytorch_grad_cam(request, tmp_path, name, kwargs, size, layer, layout):
    """vit_b_16 (image_size 64) at its default layer (the last encoder layer's ln_1); swin_t at its
    final norm (channels-last, through torchvision's patch merging by strided slices; its default
    is the NCHW `permute` after it)."""
    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer
    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    if name == "vit_b_16":  # torchvision initialises its classifier to zeros: every gradient would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    layers = [] if name == "vit_b_16" else [layer]
    onnx_model, _ = export_torch(model, layers=layers, input_size=(size, size), rules=[contract.RULE_VANILLA])
    write_model(onnx_model, tmp_path / "m.camrt.onnx")
    explainer = Explainer(tmp_path / "m.camrt.onnx", method="gradcam")
    assert explainer.layers[0] == layer and explainer.info.layer_layout(layer) == layout
    x = photo(size)
    with torch.no_grad():
        ranked = model(torch.from_numpy(x))[0].argsort(descending=True)[:10].tolist()
    with GradCAM(model=model, target_layers=[_module(model, layer)], reshape_transform=reshape_transform(layout)) as cam:
        # random weights: the top-1 class may have no positive evidence (an all-zero map compares nothing)
        target, reference = next((t, m) for t in ranked
                                 for m in cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t)]) if np.ptp(m) > 0.5)
    (result,) = explainer.explain(x, targets=[target])
    _compare(request, "gradcam", f"torchvision {name}/{layer}", result.heatmap, reference, None)
