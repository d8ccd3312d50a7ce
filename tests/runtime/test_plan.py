"""`camrt.plan.ExplainPlan`, the one answer to "what does this file offer this method", against what
running the method does: for every registered method on tiny files with and without the outputs it
needs, a plan means the Explainer opens the file and the method makes finite heatmaps; a refusal
means the Explainer refuses with the same message, the outputs it names are absent from the graph
(read with onnx), and re-exporting with the `camrt export` flags it names (the exporter is the
oracle) gives a file that serves the method. `camrt inspect --json` shows the same verdicts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from camrt import contract
from camrt.cli import build_cli
from camrt.errors import ExitCode, ModelError
from camrt.explainer import Explainer
from camrt.modelfile.metadata import read_contract, read_output_names
from camrt.plan import ExplainPlan, PlanRefused
from camrt.plugins.registry import build_method_registry
from tests.helpers import HEIGHT, WIDTH, random_image

#: make_model keyword arguments of files that lack what some methods need (tests.helpers.golden_variant's
#: defaults: layers feat (GAP + linear head) and conv, rule sets vanilla and guided, no FullGrad).
VARIANTS = {
    "layers-and-two-rule-sets": {},
    "no-layers": {"layers": (), "rule_sets": ("vanilla",)},
    "guided-only": {"rule_sets": ("guided",)},
    "deconvnet-only": {"rule_sets": ("deconvnet",)},
    "fullgrad": {"fullgrad": True},
    "conv-only-no-rules": {"layers": ("conv",), "rule_sets": ()},
}
#: The layer a `--layer NAME` flag is answered with: the tiny model's layer before the pooling.
SOME_LAYER = "feat"
ALL_METHODS = [cls.name for cls in build_method_registry()]
#: The methods the tiny files can serve. The attention methods need a transformer's attention maps,
#: which no tiny file has: their plans (served and refused, with `--attention` flags) are tested in
#: test_attention_methods.py and, on real exports, tests/exporters/test_attention_methods.py.
#: D-RISE explains box targets only (tests/exporters/test_drise.py), which the tiny classifiers have not.
METHODS = [cls.name for cls in build_method_registry() if not cls.requires.uses_attention and cls.target_kinds is None]


def graph_outputs(path: str) -> list[str]:
    return [output.name for output in onnx.load(path).graph.output]


def reexported(kwargs: dict, flags: tuple[str, ...]) -> dict:
    """The make_model arguments of the file `camrt export ... FLAGS` makes from the one `kwargs` made."""
    layers = list(kwargs.get("layers", ("feat", "conv")))
    fixed = dict(kwargs)
    for flag in flags:
        option, _, value = flag.partition(" ")
        if option == "--layer":
            layers.append(SOME_LAYER if value == "NAME" else value)
        elif option == "--rules":
            fixed["rule_sets"] = tuple(value.split(","))
        elif option == "--fullgrad":
            fixed["fullgrad"] = True
        else:
            raise AssertionError(f"unexpected export flag {flag!r}")
    fixed["layers"] = tuple(dict.fromkeys(layers))
    return fixed


@pytest.fixture(scope="module")
def models(make_model):
    """make_model, once per set of arguments."""
    made: dict[str, object] = {}

    def get(**kwargs):
        key = json.dumps(kwargs, sort_keys=True)
        if key not in made:
            made[key] = make_model(**kwargs)
        return made[key]

    return get


def former_verdict(requires, info: contract.ContractInfo) -> bool:
    """The answer `camrt inspect` gave before the plan (``Requirements.supported_by``), from the
    metadata alone: on well-formed files it must agree with the plan."""
    layer = info.default_layer or (info.layers[0] if info.layers else None)
    return ((not requires.uses_layers or layer is not None)
            and (requires.input_gradient is None or requires.input_gradient in info.rule_sets)
            and (not requires.cam_weights or layer in (info.cam_layers or ()))
            and (not requires.bias_gradients or bool(info.bias_terms)))


def plan_of(path: str, method: str, layer=None) -> ExplainPlan:
    cls = build_method_registry().get(method)
    return ExplainPlan.build(read_contract(path), graph_outputs(path), cls, layer, path)


def assert_runs(path: str, method: str, plan: ExplainPlan, images) -> None:
    explainer = Explainer(path, method=method, device="cpu")
    assert explainer.plan == plan
    assert set(plan.fetch) <= set(graph_outputs(path))
    results = explainer.explain(images)
    for result in results:
        assert result.heatmap.shape == (HEIGHT, WIDTH) and np.isfinite(result.heatmap).all()
        assert result.method == method and result.layer == (",".join(plan.layers) or None)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", METHODS)
def test_the_plan_is_what_running_the_method_does(models, variant, method, rng):
    kwargs = VARIANTS[variant]
    path = models(**kwargs).path
    images = [random_image(rng, HEIGHT, WIDTH) for _ in range(2)]
    served_before = former_verdict(build_method_registry().get(method).requires, read_contract(path))
    try:
        plan = plan_of(path, method)
    except PlanRefused as refusal:
        assert not served_before and refusal.method == method
        with pytest.raises(ModelError) as opened:
            Explainer(path, method=method, device="cpu")
        assert str(opened.value) == str(refusal)
        absent = set(graph_outputs(path))
        named = [name for name in refusal.missing if "<" not in name]  # <layer>, <node>: none exists yet
        assert refusal.missing and not absent & set(named), refusal.missing
        if not refusal.export_flags:  # only CAM on a layer without the pooling + linear head
            assert method == "cam" and all(name.startswith(contract.CAM_WEIGHTS_PREFIX) for name in refusal.missing)
            return
        for flag in refusal.export_flags:
            assert "camrt export ... " in str(refusal) and flag in str(refusal)
        fixed = models(**reexported(kwargs, refusal.export_flags)).path
        assert_runs(fixed, method, plan_of(fixed, method), images)
    else:
        assert served_before
        assert_runs(path, method, plan, images)


def test_every_method_is_served_somewhere_and_refused_somewhere(models):
    """The variants exercise both verdicts for every method (so the test above checks both)."""
    verdicts = {method: set() for method in METHODS}
    for kwargs in VARIANTS.values():
        path = models(**kwargs).path
        for method in METHODS:
            try:
                plan_of(path, method)
                verdicts[method].add(True)
            except PlanRefused:
                verdicts[method].add(False)
    missing = {m: v for m, v in verdicts.items() if v != {True, False}}
    assert not missing, missing


def test_a_named_layer_the_file_lacks(models, rng):
    path = models(layers=("conv",)).path
    with pytest.raises(PlanRefused) as refused:
        plan_of(path, "gradcam", layer=["conv", "feat"])
    assert refused.value.export_flags == ("--layer feat",)
    assert refused.value.missing == (contract.activation_output("feat"), contract.gradient_output("feat"))
    with pytest.raises(ModelError, match=r"layer\(s\) feat not in .*it has: conv.*--layer feat"):
        Explainer(path, method="gradcam", layer=["conv", "feat"])
    fixed = models(layers=("conv", "feat")).path
    plan = plan_of(fixed, "gradcam", layer=["conv", "feat"])
    assert plan.layers == ("conv", "feat")
    assert Explainer(fixed, method="gradcam", layer=["conv", "feat"], device="cpu").plan == plan


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_output_names_is_the_graphs(models, variant):
    path = models(**VARIANTS[variant]).path
    assert list(read_output_names(path)) == graph_outputs(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_shows_the_explainers_verdicts(models, variant):
    """`camrt inspect --json`'s method table against what opening each method with the Explainer
    (an onnxruntime session of the file) does."""
    path = models(**VARIANTS[variant]).path
    expected = []
    for method in ALL_METHODS:
        try:
            expected.append(Explainer(path, method=method, device="cpu").plan.to_dict())
        except PlanRefused as refusal:
            expected.append(refusal.to_dict())
    result = CliRunner().invoke(build_cli(), ["inspect", path, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method_plans"] == expected
    assert summary["methods"] == [verdict["method"] for verdict in expected if verdict["serves"]]
    text = CliRunner().invoke(build_cli(), ["inspect", path], catch_exceptions=False).stdout
    assert f"methods:          {', '.join(summary['methods']) or '(none)'}" in text
    for verdict in expected:
        if not verdict["serves"]:
            advice = " ".join(verdict["export_flags"]) or verdict["reason"]
            assert any(line.split()[:1] == [verdict["method"]] and line.rstrip().endswith(advice)
                       for line in text.splitlines()), (verdict, text)


def test_camrt_explain_reports_the_refusal(models, tmp_path, rng):
    from tests.helpers import write_image

    path = models().path
    image = write_image(str(tmp_path / "x.png"), random_image(rng, HEIGHT, WIDTH))
    with pytest.raises(PlanRefused) as refused:
        plan_of(path, "fullgrad")
    result = CliRunner().invoke(build_cli(), ["explain", path, image, "-m", "fullgrad", "-o", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == ExitCode.MODEL_ERROR
    assert str(refused.value) in result.stderr and "--fullgrad" in result.stderr
