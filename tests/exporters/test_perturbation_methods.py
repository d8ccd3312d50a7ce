"""Methods and options that run perturbed inputs: SS-CAM, IS-CAM and Smooth Grad-CAM++ against
torchcam 0.5; aug_smooth (every CAM method pytorch-grad-cam has, Score-CAM and Ablation-CAM included) against
pytorch-grad-cam 1.5.7.

Models: resnet18 and mobilenet_v3_large (fixed random weights; layer1: 64 channels, features.3: 24
channels, signed) and EfficientNet-Lite0 (real weights, _blocks.1: 24 channels, signed), exported at
32x32 (8x8 maps) so that the per-channel forward passes of both sides stay few; input: two of
scikit-image's photographs at 32x32, explicit targets.

Randomness: camrt draws its noise from ``numpy.random.default_rng(seed)`` in its documented order;
the test builds the same array and hands it to torchcam in place of torchcam's own draws (its
``_distrib.sample``), so both sides use identical noise.

Where torchcam departs from the papers (see the method modules), the reference is torchcam with the
departure removed, and the departure itself is checked:
- SS-CAM / IS-CAM: torchcam normalises A^k before upsampling; the reference subclass makes the
  masks the paper's way, s(Up(A^k)), and leaves the rest (noise, path, batching, softmax) to torchcam;
- Smooth Grad-CAM++: the noisy gradients and activations torchcam computes are recorded; the paper's
  formula on them is the reference for camrt, and torchcam's formula on them reproduces torchcam's
  own map (so the documented formula differences are the only ones).
Maps are compared at the layer's resolution after ReLU and min-max normalisation (torchcam's output),
max |diff| <= 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract

from .models import load, photos

pytest.importorskip("torchcam")
pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("skimage")

SIZE = 32
MODELS = [("resnet18", "layer1"), ("mobilenet_v3_large", "features.3"), ("efficientnet_lite0", "_blocks.1")]
TARGETS = [285, 967]
TOLERANCE = 1e-4


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def exported(request, tmp_path_factory):
    """(name, layer, torch model, module name of the layer, path of the contract file, input batch)."""
    from camrt_exporters.export import export_torch, write_model
    from camrt_exporters.torch_frontend import parse_layer


    name, layer = request.param
    model = load(name)
    onnx_model, _ = export_torch(model, layers=[layer], input_size=(SIZE, SIZE), rules=[contract.RULE_VANILLA])
    path = tmp_path_factory.mktemp("score-family") / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    return name, layer, model, parse_layer(model, layer).module, str(path), photos(SIZE)[:len(TARGETS)]


_sessions: dict = {}


def _camrt_raw(path, method, x, layer, targets=TARGETS):
    """camrt's raw maps [B, h, w] for TARGETS, through the same context the Explainer gives."""
    from camrt.execution.context import ExplainContext
    from camrt.execution.session import ExplainSession
    from camrt.methods.base import GraphOutputs

    if path not in _sessions:  # one session per file: its onnxruntime sessions are built once
        _sessions[path] = ExplainSession(path)
    session = _sessions[path]
    fetch = [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT, *method.requires.outputs([layer])]
    values = session.run(x, targets, fetch)
    outputs = GraphOutputs(values, x, ExplainContext(session, x, values[contract.TARGET_INDEX_OUTPUT]))
    return method.explain(outputs, layer=layer)


def _activations(model, module_name, x):
    import torch

    store = {}
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("a", o.detach().numpy()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    return store["a"]


class _FixedNoise:
    """Stands in for torchcam's ``_distrib``: returns the given draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def sample(self, size):
        import torch

        draw = self.draws.pop(0)
        assert tuple(size) == draw.shape, (tuple(size), draw.shape)
        return torch.from_numpy(np.ascontiguousarray(draw))


def _paper_masks(base):
    """torchcam's class with Score-CAM's masks made as the paper says, s(Up(A^k)): upsampled first,
    then normalised (torchcam normalises first); its own upsampling is then the identity."""

    class PaperMasks(base):
        def _get_weights(self, class_idx, *_, targets=None):
            activations = [self._normalize(self._upsample(act), act.ndim - 2) for act in self.hook_a]
            with self._hooks_off(), self._eval_mode():
                return self._get_score_weights(activations, class_idx, targets)

    return PaperMasks


def _torchcam_map(cam_class, model, module_name, x, setup=None, **kwargs):
    import torch

    with cam_class(model, target_layer=module_name, input_shape=x.shape[1:], **kwargs) as cam:
        if setup:
            setup(cam)
        with torch.no_grad():
            model(torch.from_numpy(x))
        return cam(class_idx=TARGETS)[0].numpy()


def _compare(ours_raw, reference, what):
    diffs = []
    for i in range(len(reference)):
        assert np.ptp(reference[i]) > 0, f"{what}: degenerate reference map for sample {i}"
        diffs.append(float(np.abs(_minmax(np.maximum(ours_raw[i], 0)) - _minmax(reference[i])).max()))
    print(f"{what}: max diff per sample {['%.2e' % d for d in diffs]}")
    assert max(diffs) <= TOLERANCE, f"{what}: max diff per sample {diffs}"


def _assert_no_constant_channels(acts):
    """camrt skips constant channels (no mask), torchcam masks them with 0: the layers used here have none."""
    flat = acts.reshape(*acts.shape[:2], -1)
    assert (flat.max(axis=2) > flat.min(axis=2)).all()


def test_sscam_matches_torchcam(exported):
    import torch
    from torchcam.methods import SSCAM as TorchcamSSCAM

    from camrt.methods.sscam import SSCAM

    name, layer, model, module_name, path, x = exported
    samples, std, seed = 2, 2.0, 7
    acts = _activations(model, module_name, x)
    _assert_no_constant_channels(acts)
    ours = _camrt_raw(path, SSCAM(n_samples=samples, std=std, seed=seed, batch_size=32), x, layer)
    # batching does not change the noise stream: the same maps with another batch size
    again = _camrt_raw(path, SSCAM(n_samples=samples, std=std, seed=seed, batch_size=7), x[:1], layer, TARGETS[:1])
    assert np.abs(again[0] - ours[0]).max() <= 1e-5 * np.abs(ours[0]).max()

    # camrt's documented order: sample by sample, noise copy by copy, channel by channel, [H, W] maps
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(x), samples, acts.shape[1], SIZE, SIZE), dtype=np.float32) * np.float32(std)
    draws = [noise[:, i] for i in range(samples)]  # torchcam draws [B, K, H, W] per copy
    with torch.no_grad():
        reference = _torchcam_map(_paper_masks(TorchcamSSCAM), model, module_name, x, batch_size=32,
                                  num_samples=samples, std=std,
                                  setup=lambda cam: setattr(cam, "_distrib", _FixedNoise(draws)))
    _compare(ours, reference, f"sscam {name}/{layer}")


def test_iscam_matches_torchcam(exported):
    from torchcam.methods import ISCAM as TorchcamISCAM

    from camrt.methods.iscam import ISCAM, path_coefficients

    name, layer, model, module_name, path, x = exported
    steps = 2
    np.testing.assert_allclose(path_coefficients(4), [0.25, 0.75, 1.5, 2.5])  # M_i = M_{i-1} + (i/N) H
    _assert_no_constant_channels(_activations(model, module_name, x))
    ours = _camrt_raw(path, ISCAM(n_samples=steps, batch_size=32), x, layer)
    reference = _torchcam_map(_paper_masks(TorchcamISCAM), model, module_name, x, batch_size=32, num_samples=steps)
    _compare(ours, reference, f"iscam {name}/{layer}")


def test_smooth_gradcampp_matches_torchcam_passes(exported):
    import torch
    from torchcam.methods import SmoothGradCAMpp

    from camrt.methods.smooth_gradcam_plusplus import SmoothGradCAMPlusPlus

    name, layer, model, module_name, path, x = exported
    samples, std, seed = 3, 0.3, 5
    ours = _camrt_raw(path, SmoothGradCAMPlusPlus(n_samples=samples, std=std, seed=seed, batch_size=2), x, layer)

    # camrt's order: sample by sample, copy by copy, each of the input's shape; torchcam draws [B, C, H, W]
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(x), samples, *x.shape[1:]), dtype=np.float32) * np.float32(std)
    recorded = {"grads": []}

    def setup(cam):
        cam._distrib = _FixedNoise([noise[:, i] for i in range(samples)])
        backprop = cam._backprop

        def recording_backprop(*args, **kwargs):
            backprop(*args, **kwargs)
            recorded["grads"].append(cam.hook_g[0].detach().numpy().astype(np.float64))
        cam._backprop = recording_backprop

    with SmoothGradCAMpp(model, target_layer=module_name, num_samples=samples, std=std) as cam:
        setup(cam)
        model(torch.from_numpy(x))
        clean = cam.hook_a[0].detach().numpy().astype(np.float64)
        torchcam_map = cam(class_idx=TARGETS)[0].numpy()
        last_noisy = cam.hook_a[0].detach().numpy().astype(np.float64)
    grads = np.stack(recorded["grads"])
    assert grads.shape[0] == samples
    d1, d2, d3 = (np.mean(grads ** p, axis=0) for p in (1, 2, 3))

    # the paper (Grad-CAM++ eq. 19 with averaged derivatives, the clean input's activations)
    sums = clean.sum(axis=(2, 3), keepdims=True)
    alpha = np.where(d2 != 0, d2 / (2 * d2 + sums * d3 + 1e-6), 0)
    weights = (alpha * np.maximum(d1, 0)).sum(axis=(2, 3))
    paper = np.maximum(np.einsum("bk,bkhw->bhw", weights, clean), 0)

    # torchcam's own formula on the same passes reproduces its map: the differences are the documented ones
    alpha_tc = d2 / (2 * d2 + (d3 * clean).sum(axis=(2, 3), keepdims=True) + 1e-8)
    weights_tc = (alpha_tc * np.maximum(grads[-1], 0)).sum(axis=(2, 3))
    torchcam_formula = np.maximum(np.einsum("bk,bkhw->bhw", weights_tc, last_noisy), 0)
    for i in range(len(x)):
        # torchcam's float32 against its formula in float64 here: on a signed layer (mobilenet_v3_large's
        # features.3 is a residual sum) the denominator cancels in places and float32 alone moves
        # torchcam's map by up to ~1.5e-4; a formula difference would be orders of magnitude larger
        assert np.abs(_minmax(torchcam_formula[i]) - torchcam_map[i]).max() <= 1e-3
    print(f"smooth-gradcam++ {name}: camrt vs stock torchcam "
          f"{max(float(np.abs(_minmax(np.maximum(o, 0)) - t).max()) for o, t in zip(ours, torchcam_map)):.2e}")
    _compare(ours, paper, f"smooth-gradcam++ {name}/{layer}")


def test_smooth_gradcampp_without_noise_is_gradcampp(exported):
    """Closed form: with std = 0 every copy is the input, D^p = g^p, and the method is Grad-CAM++."""
    from camrt.methods.gradcam_plusplus import GradCAMPlusPlus
    from camrt.methods.smooth_gradcam_plusplus import SmoothGradCAMPlusPlus

    _, layer, _, _, path, x = exported
    smooth = _camrt_raw(path, SmoothGradCAMPlusPlus(n_samples=2, std=0.0), x, layer)
    plain = _camrt_raw(path, GradCAMPlusPlus(), x, layer)
    assert np.abs(smooth - plain).max() <= 1e-5 * np.abs(plain).max()


def test_scorecam_aug_smooth_matches_pytorch_grad_cam(exported, monkeypatch):
    """aug_smooth for Score-CAM: pytorch-grad-cam's ScoreCAM with the paper's upsampling patched in."""
    import torch
    from pytorch_grad_cam import ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer

    name, layer, model, module_name, path, x = exported
    x, targets = x[1:2], TARGETS[1:2]  # coffee: chelsea's flipped copies have an all-zero channel in resnet18's layer1
    module = dict(model.named_modules())[module_name]
    for flip in (False, True):  # camrt skips constant channels; no augmented copy may have one
        for factor in (0.9, 1.0, 1.1):
            _assert_no_constant_channels(_activations(model, module_name, (x[..., ::-1] if flip else x) * factor))
    ours = Explainer(path, method="scorecam", layer=layer, aug_smooth=True, batch_size=32).explain(x, targets=targets)
    _patch_score_cam_upsampling(monkeypatch)
    with ScoreCAM(model=model, target_layers=[module]) as cam:
        reference = cam(torch.from_numpy(np.ascontiguousarray(x)), targets=[ClassifierOutputTarget(targets[0])],
                        aug_smooth=True)
    diff = float(np.abs(_minmax(ours[0].heatmap) - _minmax(reference[0])).max())
    print(f"scorecam aug_smooth {name}/{layer}: max diff {diff:.2e}")
    assert np.ptp(reference[0]) > 0.5 and diff <= TOLERANCE


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise",
                                    "layercam", "eigencam", "eigengradcam", "ablationcam"])
def test_aug_smooth_matches_pytorch_grad_cam(exported, method):
    """aug_smooth=True: the mean of the heatmaps of the six flipped / scaled inputs (ttach's
    HorizontalFlip x Multiply([0.9, 1, 1.1]), each heatmap flipped back), as pytorch-grad-cam's
    forward_augmentation_smoothing computes it, within 1e-4 on min-max maps (camrt normalises the
    mean once more; pytorch-grad-cam does not)."""
    from camrt import Explainer

    from .test_cam_methods_parity import _reference_maps

    name, layer, model, module_name, path, x = exported
    cam_options = _ablation_options(model, module_name, x) if method == "ablationcam" else None
    explainer = Explainer(path, method=method, aug_smooth=True)
    ours = explainer.explain(x, targets=TARGETS)
    reference = _reference_maps(model, layer, method, x, TARGETS, cam_options, aug_smooth=True)
    plain = _reference_maps(model, layer, method, x, TARGETS, cam_options)
    logits = explainer.session.run(x, TARGETS, [contract.LOGITS_OUTPUT])[contract.LOGITS_OUTPUT]
    # pytorch-grad-cam returns the mean of six [0, 1] maps un-normalised: its range shrinks where the
    # copies disagree, but a map of (nearly) one value would make the comparison void
    _compare_with_option(ours, reference, plain, f"{name}/{method} aug_smooth", min_range=0.05)
    for i, result in enumerate(ours):
        assert result.target == TARGETS[i] and result.score == float(logits[i, TARGETS[i]])  # the original input's record


def _compare_with_option(ours, reference, plain, what, min_range):
    """camrt's heatmaps against pytorch-grad-cam's maps with an option on, min-max, within TOLERANCE;
    the option must matter (its maps differ from `plain`, the reference without it)."""
    for i, result in enumerate(ours):
        assert np.ptp(reference[i]) > min_range, f"{what}: degenerate reference map {i}"
        diff = float(np.abs(_minmax(result.heatmap) - _minmax(reference[i])).max())
        print(f"{what} sample {i}: max diff {diff:.2e} (reference range {np.ptp(reference[i]):.2f})")
        assert diff <= TOLERANCE, f"{what} sample {i}: max diff {diff:.2e}"
        assert float(np.abs(_minmax(plain[i]) - _minmax(reference[i])).max()) > 10 * TOLERANCE  # the option matters


def _ablation_options(model, module_name, x):
    """pytorch-grad-cam's AblationCAM options for the layer: on a signed layer (no ReLU after it:
    mobilenet_v3_large's features.3, EfficientNet-Lite0's _blocks.1) pytorch-grad-cam does not zero
    channels as the paper and camrt do, and EfficientNet-Lite's blocks take a keyword argument; a
    zeroing AblationLayer handles both. After a ReLU, pytorch-grad-cam's own AblationLayer zeroes."""
    from .test_extra_pass_methods import zeroing_ablation_layer

    signed = _activations(model, module_name, x).min() < 0
    return {"ablation_layer": zeroing_ablation_layer()} if signed else {}


def _patch_score_cam_upsampling(monkeypatch):
    """pytorch-grad-cam's ScoreCAM upsamples its masks with align_corners=True; with the paper's
    align_corners=False (patched in) it is camrt's Score-CAM."""
    import torch

    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d",
                        lambda size: torch.nn.Upsample(size=size, mode="bilinear", align_corners=False))


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_eigen_smooth_matches_pytorch_grad_cam(exported, method, monkeypatch):
    """eigen_smooth=True for the methods whose channel weights take further passes: the first
    principal component of the weighted activations, as pytorch-grad-cam's get_cam_image computes it
    (Score-CAM with the paper's upsampling patched in; Ablation-CAM with channels zeroed)."""
    from camrt import Explainer

    from .test_cam_methods_parity import _reference_maps

    name, layer, model, module_name, path, x = exported
    if method == "scorecam":
        _assert_no_constant_channels(_activations(model, module_name, x))
        _patch_score_cam_upsampling(monkeypatch)
    cam_options = _ablation_options(model, module_name, x) if method == "ablationcam" else None
    ours = Explainer(path, method=method, eigen_smooth=True).explain(x, targets=TARGETS)
    reference = _reference_maps(model, layer, method, x, TARGETS, cam_options, eigen_smooth=True)
    plain = _reference_maps(model, layer, method, x, TARGETS, cam_options)
    _compare_with_option(ours, reference, plain, f"{name}/{method} eigen_smooth", min_range=0.5)


@pytest.mark.parametrize("method", ["sscam", "iscam"])
def test_eigen_smooth_of_torchcam_weights(exported, method):
    """eigen_smooth=True for SS-CAM and IS-CAM (not in pytorch-grad-cam): pytorch-grad-cam's
    projection (get_2d_projection) of torchcam's channel weights (paper masks, camrt's noise) times
    the activations."""
    import torch
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
    from torchcam.methods import ISCAM as TorchcamISCAM
    from torchcam.methods import SSCAM as TorchcamSSCAM

    from camrt.methods.iscam import ISCAM
    from camrt.methods.sscam import SSCAM

    name, layer, model, module_name, path, x = exported
    _assert_no_constant_channels(_activations(model, module_name, x))
    samples, std, seed = 2, 2.0, 3
    if method == "sscam":
        ours = _camrt_raw(path, SSCAM(n_samples=samples, std=std, seed=seed, eigen_smooth=True), x, layer)
        channels = _activations(model, module_name, x).shape[1]
        noise = np.random.default_rng(seed).standard_normal((len(x), samples, channels, SIZE, SIZE), dtype=np.float32)
        draws = [noise[:, i] * np.float32(std) for i in range(samples)]
        cam_class, kwargs = TorchcamSSCAM, {"num_samples": samples, "std": std}
        setup = lambda cam: setattr(cam, "_distrib", _FixedNoise(draws))  # noqa: E731
    else:
        ours = _camrt_raw(path, ISCAM(n_samples=samples, eigen_smooth=True), x, layer)
        cam_class, kwargs, setup = TorchcamISCAM, {"num_samples": samples}, None
    with _paper_masks(cam_class)(model, target_layer=module_name, input_shape=x.shape[1:], batch_size=32,
                                 **kwargs) as cam:
        if setup:
            setup(cam)
        with torch.no_grad():
            model(torch.from_numpy(x))
            weights = cam._get_weights(TARGETS)[0]
        weighted = (weights[:, :, None, None] * cam.hook_a[0]).numpy()
    _compare(ours, np.maximum(get_2d_projection(weighted), 0), f"{method} eigen_smooth {name}/{layer}")


def test_aug_smooth_is_refused_for_input_methods(exported):
    from camrt import Explainer
    from camrt.errors import UsageError

    path = exported[4]
    with pytest.raises(UsageError, match="aug_smooth applies to CAM-family"):
        Explainer(path, method="saliency", aug_smooth=True)
    with pytest.raises(UsageError, match="must be bool"):
        Explainer(path, method="gradcam", aug_smooth="sometimes")
    assert Explainer(path, method="gradcam", aug_smooth="true").aug_smooth is True  # text from `-O aug_smooth=true`


def test_methods_listed_with_options():
    """`camrt methods --json` lists the three methods, their aliases, requirements and typed options;
    unknown options are errors that list the valid ones."""
    import json

    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.errors import UsageError
    from camrt.methods.sscam import SSCAM

    result = CliRunner().invoke(build_cli(), ["methods", "--json"], catch_exceptions=False)
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    expected = {
        "sscam": ({"batch_size", "n_samples", "std", "seed", "noise", "eigen_smooth", "aug_smooth"}, False),
        "iscam": ({"batch_size", "n_samples", "eigen_smooth", "aug_smooth"}, False),
        "smooth-gradcam++": ({"n_samples", "std", "seed", "batch_size", "eigen_smooth", "aug_smooth"}, True),
    }
    for name, (options, gradients) in expected.items():
        assert {o["name"] for o in listed[name]["options"]} == options, name
        assert listed[name]["requires"]["extra_passes"] is True and listed[name]["requires"]["gradients"] is gradients
    assert "smoothgradcampp" in listed["smooth-gradcam++"]["aliases"]
    assert SSCAM(n_samples="3", std="0.5").options.std == 0.5
    with pytest.raises(UsageError, match="valid options: batch_size, eigen_smooth, n_samples, noise, seed, std"):
        SSCAM(sigma=1)
    with pytest.raises(UsageError, match="n_samples must be >= 1"):
        SSCAM(n_samples=0)
    with pytest.raises(UsageError, match="noise must be 'mask' or 'input', got 'pixels'"):
        SSCAM(noise="pixels")
