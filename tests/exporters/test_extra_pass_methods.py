"""Methods that run further passes through the contract file (`camrt.execution.context.ExplainContext`).

resnet18 and mobilenet_v3_large (fixed random weights, tests/exporters/models.py), each exported
once, rules vanilla, with three layers (CASES): one for Ablation-CAM (resnet18 layer4,
mobilenet_v3_large features.4.block.1: both after a ReLU), one for Score-CAM (few channels keep the oracle's forward passes
few: layer1, features.3) and one whose tail also reads a skip connection (layer4.1.conv1,
features.15.block.0). Each method is checked against an oracle run in torch on the same model and
input:
- Ablation-CAM == pytorch-grad-cam 1.5.7 AblationCAM, min-max maps, max diff <= 1e-4;
- Score-CAM == the paper's Algorithm 1 written here in torch (torchcam normalises before upsampling
  and pytorch-grad-cam upsamples with align_corners=True, so neither is the paper's formula),
  min-max maps, max diff <= 1e-4;
- SmoothGrad == Captum NoiseTunnel(Saliency(abs=False)) fed camrt's noise, relative L2 <= 1e-2;
- Integrated Gradients == Captum IntegratedGradients (same steps, baseline, method), relative L2
  <= 1e-2; completeness within 1% at 64 Gauss-Legendre steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract

from .models import load, photos

pytest.importorskip("pytorch_grad_cam")
pytest.importorskip("captum")
pytest.importorskip("skimage")

#: model -> (Ablation-CAM's layer, Score-CAM's layer, a layer whose tail reads one skip connection,
#: a signed layer (negative values: no ReLU after it) for Ablation-CAM)
CASES = {
    "resnet18": ("layer4", "layer1", "layer4.1.conv1", "layer4.0.downsample"),
    "mobilenet_v3_large": ("features.4.block.1", "features.3", "features.15.block.0", "features.15"),
}
TARGETS = [285, 967, 450]


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)


def _rel_l2(a, b):
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(torch model, contract file path, photos, CASES' layers of the model)."""
    from camrt_exporters.export import export_torch, write_model


    name = request.param
    model = load(name)
    onnx_model, _ = export_torch(model, layers=list(CASES[name]), rules=[contract.RULE_VANILLA])
    path = tmp_path_factory.mktemp("extra-pass") / f"{name}.camrt.onnx"
    write_model(onnx_model, path)
    return model, str(path), photos(), CASES[name]


def _module(model, layer):
    return dict(model.named_modules())[layer]


def test_tail_graph_reproduces_logits(exported):
    from camrt.execution.session import ExplainSession

    _, path, x, (ablation, _, skip, _) = exported
    session = ExplainSession(path)
    got = session.run(x, TARGETS, [contract.LOGITS_OUTPUT, *(contract.activation_output(n) for n in (ablation, skip))])
    logits = got[contract.LOGITS_OUTPUT]
    assert session.tail_plan(ablation).side == ()  # the layer dominates everything after it
    plan = session.tail_plan(skip)
    assert len(plan.side) == 1  # the skip connection around the block
    for layer in (ablation, skip):
        side = session.tail_side_tensors(layer, x)
        tail = session.run_tail(layer, got[contract.activation_output(layer)], side)
        assert np.abs(tail - logits).max() <= 1e-4 * np.abs(logits).max(), layer
    with pytest.raises(Exception, match="side"):
        session.run_tail(skip, got[contract.activation_output(skip)])


def _check_ablationcam(model, path, x, layer, ablation_layer=None):
    """camrt's Ablation-CAM of the first photo against pytorch-grad-cam's, min-max maps within 1e-4."""
    import torch
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from camrt import Explainer

    x, targets = x[:1], TARGETS[:1]  # pytorch-grad-cam runs the whole model once per channel
    results = Explainer(path, method="ablationcam", layer=layer, batch_size=48).explain(x, targets=targets)
    with AblationCAM(model=model, target_layers=[_module(model, layer)], batch_size=64,
                     ablation_layer=ablation_layer or AblationLayer()) as cam:
        reference = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(t) for t in targets])
    for i, r in enumerate(results):
        assert np.ptp(reference[i]) > 0.5
        diff = float(np.abs(_minmax(r.heatmap) - _minmax(reference[i])).max())
        print(f"ablationcam {layer} sample {i}: max diff {diff:.2e}")
        assert diff <= 1e-4, diff


def test_ablationcam_matches_pytorch_grad_cam(exported):
    """After a ReLU (minimum 0) pytorch-grad-cam zeroes the ablated channel, as the paper does."""
    model, path, x, (layer, _, _, _) = exported
    _check_ablationcam(model, path, x, layer)


def test_ablationcam_on_a_signed_layer_zeroes_channels_as_the_paper(exported):
    """On a signed layer camrt still sets the channel to 0 (the paper); pytorch-grad-cam writes
    min - 1e7 there, cumulatively within its batch, so it is given an AblationLayer that zeroes."""
    from camrt.execution.session import ExplainSession

    model, path, x, (_, _, _, layer) = exported
    acts = ExplainSession(path).run(x[:1], TARGETS[:1], [contract.activation_output(layer)])
    assert acts[contract.activation_output(layer)].min() < 0  # signed indeed
    _check_ablationcam(model, path, x, layer, zeroing_ablation_layer())


def zeroing_ablation_layer():
    """pytorch-grad-cam's AblationLayer, but setting the ablated channel to 0 on any layer (the
    paper; pytorch-grad-cam writes min - 1e7 on signed layers) and accepting the keyword arguments
    of the module it replaces (EfficientNet-Lite's blocks take drop_connect_rate)."""
    from pytorch_grad_cam.ablation_layer import AblationLayer

    class ZeroingAblationLayer(AblationLayer):
        def __call__(self, x, **kwargs):
            output = self.activations
            output[np.arange(output.size(0)), self.indices[:output.size(0)]] = 0
            return output

    return ZeroingAblationLayer()


def _scorecam_oracle(model, module, x, targets, top=0, input_noise=None):
    """Score-CAM, Algorithm 1 of Wang et al. 2020, in torch: masks s(Up(A^k)) (bilinear, pixel
    centres), alpha = softmax over channels of the target logit of X o H^k (the baseline term is a
    constant, it cancels), map = ReLU(sum_k alpha_k A^k), upsampled and min-max normalised.
    top > 0: only the `top` channels of largest activation variance are scored (Faster Score-CAM).
    input_noise (SS-CAM's noise="input"): a function (sample, live channels) -> noise [N, n, C, H, W];
    each channel's score is then the mean target logit of X o H^k + noise[i] over the N copies."""
    import torch
    import torch.nn.functional as F

    store = {}
    handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(torch.from_numpy(x))
    handle.remove()
    acts = store["a"]
    maps = []
    with torch.no_grad():
        for b, t in enumerate(targets):
            up = F.interpolate(acts[b:b + 1].transpose(0, 1), size=x.shape[2:], mode="bilinear", align_corners=False)
            low = up.amin(dim=(2, 3), keepdim=True)
            high = up.amax(dim=(2, 3), keepdim=True)
            live = (high > low).flatten()
            if top:
                variance = torch.where(live, acts[b].flatten(1).var(dim=1, unbiased=False), -1.0)
                live = torch.zeros_like(live).index_fill_(0, torch.topk(variance, top).indices, True)
            masks = ((up - low) / (high - low))[live]
            masked = torch.from_numpy(x[b:b + 1]) * masks
            copies = [masked] if input_noise is None else [masked + torch.from_numpy(n)
                                                           for n in input_noise(b, masks.shape[0])]
            scores = torch.stack([torch.cat([model(inputs[i:i + 16])[:, t] for i in range(0, inputs.shape[0], 16)])
                                  for inputs in copies]).double().mean(dim=0)
            alpha = torch.zeros(acts.shape[1], dtype=torch.float64)
            alpha[live] = torch.softmax(scores.double(), dim=0)
            cam = torch.relu(torch.einsum("k,khw->hw", alpha.float(), acts[b]))
            cam = F.interpolate(cam[None, None], size=x.shape[2:], mode="bilinear", align_corners=False)[0, 0]
            maps.append(_minmax(cam.numpy()))
    return maps


def test_scorecam_matches_paper_formula(exported):
    from camrt import Explainer

    model, path, x, (_, layer, _, _) = exported
    x, targets = x[:2], TARGETS[:2]
    results = Explainer(path, method="scorecam", layer=layer, batch_size=24).explain(x, targets=targets)
    reference = _scorecam_oracle(model, _module(model, layer), x, targets)
    for i, r in enumerate(results):
        assert np.ptp(reference[i]) > 0.5
        diff = float(np.abs(_minmax(r.heatmap) - reference[i]).max())
        print(f"scorecam sample {i}: max diff {diff:.2e}")
        assert diff <= 1e-4, diff


def test_sscam_input_noise_matches_the_formula(exported):
    """SS-CAM with noise="input" (the paper's second variant): noise of the input's shape added to
    each masked input, drawn in camrt's documented order, against the formula written in torch."""
    from camrt import Explainer

    model, path, x, (_, layer, _, _) = exported
    x, targets = x[:2], TARGETS[:2]
    samples, std, seed = 2, 0.5, 11
    results = Explainer(path, method="sscam", layer=layer, noise="input", n_samples=samples, std=std, seed=seed,
                        batch_size=24).explain(x, targets=targets)
    rng = np.random.default_rng(seed)

    def noise(sample, live):  # sample by sample, copy by copy, live channel by channel
        return [rng.standard_normal((live, *x.shape[1:]), dtype=np.float32) * np.float32(std) for _ in range(samples)]

    reference = _scorecam_oracle(model, _module(model, layer), x, targets, input_noise=noise)
    plain = Explainer(path, method="scorecam", layer=layer).explain(x, targets=targets)
    for i, r in enumerate(results):
        assert np.ptp(reference[i]) > 0.5
        diff = float(np.abs(_minmax(r.heatmap) - reference[i]).max())
        print(f"sscam noise=input sample {i}: max diff {diff:.2e}")
        assert diff <= 1e-4, diff
        assert np.abs(r.heatmap - plain[i].heatmap).max() > 1e-3  # the noise matters (10x the bound)


def test_scorecam_top_channels_matches_the_formula_on_those_channels(exported):
    """Option top_channels=N: Algorithm 1 over the N channels of largest activation variance only."""
    from camrt import Explainer

    model, path, x, (_, layer, _, _) = exported
    exact = Explainer(path, method="scorecam", layer=layer, batch_size=24).explain(x[:1], targets=TARGETS[:1])
    fast = Explainer(path, method="scorecam", layer=layer, batch_size=24, top_channels=12).explain(
        x[:1], targets=TARGETS[:1])
    reference = _scorecam_oracle(model, _module(model, layer), x[:1], TARGETS[:1], top=12)[0]
    diff = float(np.abs(_minmax(fast[0].heatmap) - reference).max())
    print(f"scorecam top_channels=12: max diff {diff:.2e} vs the formula on those channels; "
          f"{float(np.abs(fast[0].heatmap - exact[0].heatmap).max()):.2e} vs the exact map")
    assert diff <= 1e-4, diff
    assert np.abs(fast[0].heatmap - exact[0].heatmap).max() > 1e-3  # 12 of 64 (24) channels: not the exact map


def test_smoothgrad_matches_captum_noise_tunnel(exported, monkeypatch):
    import torch
    from captum.attr import NoiseTunnel, Saliency

    from camrt.execution.context import ExplainContext
    from camrt.execution.session import ExplainSession
    from camrt.methods.base import GraphOutputs
    from camrt.methods.smoothgrad import SmoothGrad, noise_sigma

    model, path, x, _ = exported
    x, targets = x[:2], TARGETS[:2]
    n, spread, seed = 6, 0.15, 3
    method = SmoothGrad(n_samples=n, stdev_spread=spread, seed=seed, batch_size=4)
    session = ExplainSession(path)
    values = session.run(x, targets, [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT])
    ours = method.attribution(GraphOutputs(values, x, ExplainContext(session, x, values[contract.TARGET_INDEX_OUTPUT])))

    # camrt's documented noise: default_rng(seed), sample by sample, copy by copy, times sigma.
    rng = np.random.default_rng(seed)
    sigma = noise_sigma(x, spread)
    noise = np.concatenate([rng.standard_normal((n, *x.shape[1:]), dtype=np.float32) * sigma[b] for b in range(len(x))])
    calls = []

    def fixed_noise(mean, std, *args, **kwargs):  # Captum draws torch.normal(0, std) of the expanded input
        calls.append(tuple(std.shape))
        return torch.from_numpy(noise)

    monkeypatch.setattr(torch, "normal", fixed_noise)
    reference = NoiseTunnel(Saliency(model)).attribute(
        torch.from_numpy(x), nt_type="smoothgrad", nt_samples=n, stdevs=float(sigma[0]), target=targets, abs=False
    ).detach().numpy()
    monkeypatch.undo()
    assert calls == [noise.shape]
    err = _rel_l2(ours, reference)
    print(f"smoothgrad relative L2 {err:.2e}")
    assert err <= 1e-2
    maps = __import__("camrt").Explainer(path, method="smoothgrad", n_samples=2).explain(x, targets=targets)
    assert all(m.heatmap.shape == x.shape[2:] for m in maps)


def test_integrated_gradients_matches_captum(exported):
    import torch
    from captum.attr import IntegratedGradients as CaptumIG

    from camrt import Explainer
    from camrt.execution.context import ExplainContext
    from camrt.execution.session import ExplainSession
    from camrt.methods.base import GraphOutputs
    from camrt.methods.integrated_gradients import IntegratedGradients

    model, path, x, _ = exported
    x, targets = x[:2], TARGETS[:2]
    session = ExplainSession(path)
    values = session.run(x, targets, [contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT])
    context = ExplainContext(session, x, values[contract.TARGET_INDEX_OUTPUT])
    steps = 16
    ours = IntegratedGradients(steps=steps, method="riemann_trapezoid", batch_size=5).attribution(
        GraphOutputs(values, x, context))
    reference = CaptumIG(model).attribute(torch.from_numpy(x), baselines=torch.zeros(1, *x.shape[1:]),
                                          target=targets, n_steps=steps, method="riemann_trapezoid").detach().numpy()
    err = _rel_l2(ours, reference)
    print(f"integrated gradients (riemann_trapezoid, {steps} steps) relative L2 {err:.2e}")
    assert err <= 1e-2

    result = Explainer(path, method="integrated-gradients", steps=64).explain(x[:1], targets=targets[:1])[0]
    completeness = result.extra["completeness"]
    relative = abs(completeness["delta"]) / abs(completeness["score_difference"])
    print(f"integrated gradients (gausslegendre, 64 steps) completeness {completeness}, relative {relative:.2e}")
    assert relative <= 1e-2
    assert result.record()["completeness"] == completeness
