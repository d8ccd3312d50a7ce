"""CAM and FullGrad on the tiny model (Conv+bias -> Relu -> GAP -> Flatten -> Gemm+bias -> Softmax),
against closed forms computed with numpy from its weights (`tiny.numpy_forward`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from camrt import contract, postprocess
from camrt.errors import ModelError
from camrt.explainer import Explainer
from camrt.imaging.preprocess import preprocess
from camrt.methods.base import GraphOutputs
from tests.helpers import HEIGHT, WIDTH, numpy_forward, random_image

TARGETS = [0, 3, -1, 4]


def _batch(tiny, rng):
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(len(TARGETS))]
    x = preprocess(images, tiny.preprocessing)
    forward = numpy_forward(tiny, x)
    resolved = [t if t >= 0 else int(forward["logits"][i].argmax()) for i, t in enumerate(TARGETS)]
    return images, x, forward, resolved


def test_cam_weights_are_the_classifier_rows_of_the_target(tiny, rng):
    explainer = Explainer(tiny.path, method="cam", layer="feat", device="cpu")
    assert explainer.info.cam_layers == ["feat"]  # "conv" feeds the Relu, not the pooling
    _, x, _, resolved = _batch(tiny, rng)
    values = explainer.session.run(x, TARGETS, explainer.fetch)
    np.testing.assert_array_equal(GraphOutputs(values, x).cam_weights("feat"), tiny.w2[resolved])


def test_cam_heatmap_closed_form(tiny, rng):
    """M_c = sum_k w_k^c f_k (Zhou et al. 2016), signed (no ReLU), min-max normalised and upsampled."""
    images, _, forward, resolved = _batch(tiny, rng)
    results = Explainer(tiny.path, method="cam", device="cpu").explain(images, TARGETS)
    for i, result in enumerate(results):
        cam = np.einsum("k,khw->hw", tiny.w2[resolved[i]].astype(np.float64), forward["feat"][i])
        expected = postprocess.finalize([cam], (HEIGHT, WIDTH), apply_relu=False)
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
        assert result.target == resolved[i] and result.method == "cam"


def test_cam_refuses_a_layer_without_gap_fc_head(tiny):
    with pytest.raises(ModelError, match=r"layer\(s\) conv .*not followed by global average pooling.*gradcam"):
        Explainer(tiny.path, method="cam", layer="conv", device="cpu")


def test_fullgrad_without_its_outputs_names_what_is_missing(make_model):
    model = make_model(rule_sets=("guided",))
    with pytest.raises(ModelError) as error:
        Explainer(model.path, method="fullgrad", device="cpu")
    message = str(error.value)
    for part in ("'fullgrad'", contract.input_gradient_output("vanilla"), contract.BIAS_GRADIENT_PREFIX,
                 "--rules guided,vanilla", "--fullgrad"):
        assert part in message, message


def test_fullgrad_bias_terms_complete_the_logit(make_model, rng):
    """Full-gradient completeness (Srinivas & Fleuret 2019, sec. 3) of this ReLU network:
    logit_c = <d logit_c / d x, x> + <d logit_c / d conv, b1> + b2[c]; the file's one bias term is
    d logit_c / d conv * b1 (the Gemm's bias is not a Conv/BatchNorm bias, as in pytorch-grad-cam)."""
    model = make_model(fullgrad=True)
    explainer = Explainer(model.path, method="fullgrad", device="cpu")
    assert explainer.info.bias_terms == ["conv"]
    _, x, forward, resolved = _batch(model, rng)
    outputs = GraphOutputs(explainer.session.run(x, TARGETS, explainer.fetch), x)
    (term,) = outputs.bias_gradients()
    input_part = (outputs.input_gradient("vanilla").astype(np.float64) * x).sum(axis=(1, 2, 3))
    decomposition = input_part + term.astype(np.float64).sum(axis=(1, 2, 3)) + model.b2[resolved]
    np.testing.assert_allclose(decomposition, forward["logits"][np.arange(len(x)), resolved], rtol=1e-5, atol=1e-6)


def test_methods_and_inspect_list_cam_and_fullgrad(tiny, make_model):
    from click.testing import CliRunner

    from camrt.cli import build_cli
    from camrt.cli.inspect import contract_summary

    result = CliRunner().invoke(build_cli(), ["methods", "--json"], catch_exceptions=False)
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    assert listed["cam"]["requires"] == {"activations": True, "gradients": False, "input_gradient": None,
                                         "cam_weights": True}
    assert listed["fullgrad"]["requires"] == {"activations": False, "gradients": False, "input_gradient": "vanilla",
                                              "bias_gradients": True}
    assert "cam" in contract_summary(tiny.path)["methods"]
    assert "fullgrad" not in contract_summary(tiny.path)["methods"]
    assert "fullgrad" in contract_summary(make_model(fullgrad=True).path)["methods"]
