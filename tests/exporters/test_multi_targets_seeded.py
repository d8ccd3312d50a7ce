"""Several class targets per image on a file with a seed entry (`camrt export --seed`): top-k, class
lists and thresholds stack one-hot seeds along the batch and run one forward pass and one batched
backward pass (`camrt.seeded_explain.stacked_maps`).

Oracles: the class path of the same file (one fused run per class: maps within 1e-5) and
pytorch-grad-cam 1.5.7's GradCAM with ClassifierOutputTarget per class on the torch model (max abs
of min-max normalised maps <= 1e-4); the torch model's logits for the classes and scores.
"""

from __future__ import annotations

import numpy as np
import pytest

from camrt import contract
from camrt.target_parsing import parse_target
from camrt.targets import ThresholdRequest, TopKRequest
from tests.helpers import count_runs

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_grad_cam")

SIZE = (64, 64)
LAYER = "layer4"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from torchvision.models import resnet18

    from camrt_exporters.export import export_torch, write_model

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    onnx_model, _ = export_torch(model, layers=[LAYER], input_size=SIZE, rules=[contract.RULE_VANILLA], seed=True)
    path = tmp_path_factory.mktemp("seededcls") / "resnet18.camrt.onnx"
    write_model(onnx_model, path)
    return model, str(path)


def _inputs(count=2):
    return np.random.default_rng(11).standard_normal((count, 3, *SIZE)).astype(np.float32)


def _minmax(m):
    m = m - m.min()
    return m / (m.max() + 1e-7)



def _check_against_class_path_and_pytorch_grad_cam(model, explainer, x, stacked, method="gradcam"):
    """Each stacked map equals the class path's map of its class (1e-5), and for Grad-CAM
    pytorch-grad-cam's (1e-4); its score is the torch logit."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    worst_class, worst_reference = 0.0, 0.0
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        for i, results in enumerate(stacked):
            for result in results:
                single = explainer.explain(x[i:i + 1], targets=result.target)[0]
                worst_class = max(worst_class, float(np.abs(result.heatmap - single.heatmap).max()))
                assert result.score == pytest.approx(float(logits[i, result.target]), rel=1e-4, abs=1e-4)
                if method == "gradcam":
                    reference = cam(torch.from_numpy(x[i:i + 1]), targets=[ClassifierOutputTarget(result.target)])[0]
                    worst_reference = max(worst_reference, float(np.abs(result.heatmap - _minmax(reference)).max()))
    print(f"stacked {method}: vs class path {worst_class:.1e}"
          + (f", vs pytorch-grad-cam {worst_reference:.1e}" if method == "gradcam" else ""))
    assert worst_class <= 1e-5 and worst_reference <= 1e-4


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_top_k_runs_one_forward_and_one_batched_backward(classifier, method):
    from camrt.explainer import Explainer
    from camrt.seeded_explain import seeded_fetch, stacks_targets

    model, path = classifier
    explainer = Explainer(path, method=method)
    assert stacks_targets(explainer)
    x = _inputs()
    plan = explainer.session.seeded_plan(seeded_fetch(explainer))
    forward, backward = count_runs(plan.forward_session), count_runs(plan.backward_session)
    backward_rows = []
    original = plan.backward_session.run
    plan.backward_session.run = lambda names, feeds, *a: (backward_rows.append(len(feeds[contract.SEED_TENSOR])),
                                                           original(names, feeds, *a))[1]
    stacked = explainer.explain_request(x, TopKRequest(3))
    assert (len(forward), len(backward), backward_rows) == (1, 1, [6])
    with torch.no_grad():
        order = np.argsort(-model(torch.from_numpy(x)).numpy(), axis=1, kind="stable")[:, :3]
    assert [[r.target for r in results] for results in stacked] == order.tolist()
    _check_against_class_path_and_pytorch_grad_cam(model, explainer, x, stacked, method)


def test_class_list_and_threshold_stack_their_classes(classifier):
    """--target 281,285 and above:T (T between the images' scores: 3 classes of one image, 1 or
    more of the other) on the stacked path: each map is its class's."""
    from camrt.explainer import Explainer

    model, path = classifier
    explainer = Explainer(path, method="gradcam")
    x = _inputs()
    listed = explainer.explain_request(x, parse_target("281,285"))
    assert [[r.target for r in results] for results in listed] == [[281, 285]] * 2
    _check_against_class_path_and_pytorch_grad_cam(model, explainer, x, listed)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    threshold = float(np.sort(logits[0])[-4])  # image 0: its 3 best classes are above it
    wanted = [[int(c) for c in np.argsort(-row) if row[c] > threshold] for row in logits]
    above = explainer.explain_request(x, ThresholdRequest(threshold))
    assert [[r.target for r in results] for results in above] == wanted and len(wanted[0]) == 3
    _check_against_class_path_and_pytorch_grad_cam(model, explainer, x, above)
    nothing = explainer.explain_request(x, ThresholdRequest(float(logits.max()) + 1))
    assert nothing == [[], []]
