"""Bad and hostile model files: refused with a ModelError/ContractError naming the file and what
to do, before onnxruntime sees them and, for external data outside the model's folder, before
any of it is read. Files that are fine give the results of the same model stored in one file."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, helper

from camrt import contract
from camrt.errors import ContractError, ModelError, UsageError
from camrt.execution.session import ExplainSession
from camrt.explainer import Explainer
from camrt.modelfile.checks import CUSTOM_OP_LIBRARIES_ENV
from camrt.plugins.registry import build_method_registry

from .tally import refused


def _open(path, **kwargs):
    return ExplainSession(str(path), device="cpu", **kwargs)


def _copy_model(tiny, folder, name="model.onnx", edit=None) -> str:
    model = onnx.load(tiny.path)
    if edit is not None:
        edit(model)
    path = str(folder / name)
    onnx.save(model, path)
    return path


def test_files_that_are_not_onnx(tmp_path, tiny):
    data = open(tiny.path, "rb").read()
    cases = {
        "empty.onnx": (b"", "not an ONNX file (the file is empty)"),
        "text.onnx": (b"ir_version: 8\ngraph { }\n", "not an ONNX file"),
        "image.onnx": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not an ONNX file"),
        "zeros.onnx": (b"\x00" * 100, "not an ONNX file"),
    }
    # truncated protobuf, cut at ten places through the file (the graph, the weights, the metadata)
    for i, cut in enumerate(np.linspace(1, len(data) - 1, 10).astype(int)):
        cases[f"truncated{i}.onnx"] = (data[:cut], "not an ONNX file")
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        refused(lambda: _open(path), ModelError, str(path), reason)
    refused(lambda: _open(tmp_path), ModelError, str(tmp_path), "not a file (a directory)")


def test_plain_onnx_says_to_run_camrt_export(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    path = str(tmp_path / "plain.onnx")
    onnx.save(helper.make_model(graph), path)
    refused(lambda: _open(path), ModelError, path, "valid ONNX but not a camrt file", "run `camrt export`")


@pytest.mark.parametrize(("key", "value", "reason"), [
    (contract.META_CONTRACT_VERSION, "2", "contract version '2' is not supported"),
    (contract.META_CONTRACT_VERSION, "one", "contract version 'one' is not supported"),
    (contract.META_PREPROCESSING, '{"height": 1000000000, "width": 16, "mean": [0, 0, 0], "std": [1, 1, 1]}', "height 1000000000 is not an integer in 1..16384"),
    (contract.META_PREPROCESSING, '{"height": 12, "width": 16, "std": [1, 0, 1], "mean": [0, 0, 0]}', "has a zero"),
    (contract.META_PREPROCESSING, '{"height": 12, "width": 16, "mean": [0, NaN, 0], "std": [1, 1, 1]}', "3 finite numbers"),
    (contract.META_PREPROCESSING, '{"height": 12}', "malformed (no 'mean' field)"),
    (contract.META_PREPROCESSING, "[]", "malformed"),
    (contract.META_PREPROCESSING, '{"height": 24, "width": 16, "mean": [0, 0, 0], "std": [1, 1, 1]}', "has shape ('N', 3, 12, 16)"),
    (contract.META_LAYERS, "[not json", "is not valid JSON"),
    (contract.META_INPUT, "nope", "no input 'nope'"),
])
def test_contract_metadata_problems(tmp_path, tiny, key, value, reason):
    def edit(model):
        for prop in model.metadata_props:
            if prop.key == key:
                prop.value = value

    path = _copy_model(tiny, tmp_path, edit=edit)
    refused(lambda: _open(path), ContractError, path, reason, "camrt export")


def test_missing_outputs_name_the_export_flags(tmp_path, make_model):
    no_layers = make_model(layers=(), rule_sets=("vanilla",))
    refused(lambda: Explainer(no_layers.path, method="gradcam", device="cpu"), ModelError, no_layers.path,
            "has no layers", "--layer")
    refused(lambda: Explainer(no_layers.path, method="guided-backprop", device="cpu"), ModelError,
            no_layers.path, "camrt/input_grad/guided", "--rules vanilla,guided")

    def drop_gradient(model):
        keep = [o for o in model.graph.output if o.name != contract.gradient_output("feat")]
        del model.graph.output[:]
        model.graph.output.extend(keep)

    path = _copy_model(make_model(), tmp_path, "no_grad.onnx", drop_gradient)
    refused(lambda: Explainer(path, method="gradcam", device="cpu", layer="feat"), ModelError, path,
            "camrt/grad/feat", "--layer feat")


@pytest.mark.parametrize("method", sorted(build_method_registry().names()))
def test_every_method_names_what_a_bare_file_lacks(make_model, method):
    """A file with no layers and no input gradients: every built-in method is refused when the file
    is opened, naming the method, the file, what it needs from it and the `camrt export` flags that
    add it (all of them at once: guided-gradcam needs a layer and the guided rule set)."""
    bare = make_model(layers=(), rule_sets=())
    requires = build_method_registry().get(method).requires
    expected = []
    if requires.uses_layers:
        expected += ["has no layers", "--layer NAME"]
        expected += [what for what, needed in (("activations", requires.activations), ("gradients", requires.gradients),
                                               ("CAM class weights", requires.cam_weights)) if needed]
    if requires.input_gradient:
        expected.append(f"--rules {requires.input_gradient}")
    if requires.bias_gradients:
        expected.append("--fullgrad")
    if build_method_registry().get(method).target_kinds == ("box",):  # D-RISE reads only the score
        assert Explainer(bare.path, method=method, device="cpu").method.name == method
        return
    refused(lambda: Explainer(bare.path, method=method, device="cpu"), ModelError, bare.path,
            f"method {method!r}", "camrt export", *expected)


def test_double_image_input_is_refused(tmp_path, tiny):
    def edit(model):
        model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    path = _copy_model(tiny, tmp_path, edit=edit)
    refused(lambda: _open(path), ContractError, path, "image input 'image' is double", "float32 or float16")


def test_graphs_onnx_checker_refuses(tmp_path, tiny):
    def cycle(model):  # conv reads feat, which depends on conv
        model.graph.node[0].input[0] = "feat"

    def dangling(model):
        model.graph.node[1].input[0] = "nowhere"

    for name, edit in (("cycle.onnx", cycle), ("dangling.onnx", dangling)):
        path = _copy_model(tiny, tmp_path, name, edit)
        refused(lambda: _open(path), ModelError, path, "not a valid ONNX graph", "camrt export")


# --- external data ------------------------------------------------------------------------------


def _external(tiny, folder) -> str:
    """The tiny model with every initializer in folder/weights.bin."""
    folder.mkdir(exist_ok=True)
    path = str(folder / "model.onnx")
    onnx.save(onnx.load(tiny.path), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    return path


def _relocate(path: str, location: str, offset: int | None = None) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
                if entry.key == "offset" and offset is not None:
                    entry.value = str(offset)
    onnx.save(model, path)


def test_external_data_inside_the_folder_gives_the_same_results(tmp_path, tiny, rng):
    path = _external(tiny, tmp_path / "ok")
    stored = onnx.load(path, load_external_data=False)
    assert sum(external_data_helper.uses_external_data(t) for t in stored.graph.initializer) >= 4  # w1 b1 w2 b2
    x = rng.standard_normal((3, 3, 12, 16)).astype(np.float32)
    expected = [r.heatmap for r in Explainer(tiny.path, device="cpu").explain(x)]
    got = [r.heatmap for r in Explainer(path, device="cpu").explain(x)]
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def opened_files(monkeypatch):
    """Paths Python opens from now on (audit events), and onnx's external-data loader disabled."""
    opened: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], str):
            opened.append(os.path.realpath(args[0]))

    sys.addaudithook(hook)  # cannot be removed: switched off after the test instead
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model",
                        lambda *a: pytest.fail("external data was loaded"))
    yield opened
    active[0] = False


def test_external_data_escaping_the_folder_is_refused_before_reading(tmp_path, tiny, opened_files):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"\x00" * 4096)
    cases = []
    for name, location in (("absolute", str(secret)), ("dotdot", "../outside/secret.bin"),
                           ("nested_dotdot", "sub/../../outside/secret.bin"), ("symlink", "link.bin")):
        path = _external(tiny, tmp_path / name)
        _relocate(path, location)
        if name == "symlink":
            os.symlink(secret, tmp_path / name / "link.bin")
        cases.append((path, location, {"absolute": "an absolute path", "dotdot": "a path with '..'",
                                       "nested_dotdot": "a path with '..'", "symlink": "outside the folder"}[name]))
    beyond = _external(tiny, tmp_path / "beyond")
    _relocate(beyond, "weights.bin", offset=10**9)
    cases.append((beyond, "weights.bin", "beyond the file's"))
    missing = _external(tiny, tmp_path / "missing")
    _relocate(missing, "nothing.bin")
    cases.append((missing, "nothing.bin", "does not exist"))
    opened_files.clear()  # from here on: only what camrt opens
    for path, location, reason in cases:
        refused(lambda: _open(path), ModelError, path, f"keeps its data in {location!r}", reason,
                "only from files inside the model's folder")
    assert os.path.realpath(secret) not in opened_files
    assert {os.path.realpath(path) for path, _, _ in cases} <= set(opened_files)  # the hook does see opens


# --- custom ops ---------------------------------------------------------------------------------


def _with_custom_node(tiny, folder, domain="com.example.ops", op_type="Frobnicate") -> str:
    def edit(model):
        model.graph.node.append(helper.make_node(op_type, ["feat"], ["custom_out"], name="custom", domain=domain))
        model.graph.output.append(helper.make_tensor_value_info("custom_out", onnx.TensorProto.FLOAT, None))
        model.opset_import.append(helper.make_opsetid(domain, 1))

    return _copy_model(tiny, folder, f"{op_type}.onnx", edit)


def test_custom_op_domain_is_refused_unless_a_library_is_given(tmp_path, tiny, monkeypatch):
    monkeypatch.delenv(CUSTOM_OP_LIBRARIES_ENV, raising=False)
    path = _with_custom_node(tiny, tmp_path)
    refused(lambda: _open(path), ModelError, path, "node 'custom'", "custom domain 'com.example.ops'",
            "custom_op_libraries", CUSTOM_OP_LIBRARIES_ENV)
    ep_context = _with_custom_node(tiny, tmp_path, domain="com.microsoft", op_type="EPContext")
    refused(lambda: _open(ep_context), ModelError, ep_context, "EPContext", "read a file named in the model")
    # Allowing means naming libraries; each must exist and really be a custom-op library.
    refused(lambda: _open(path, custom_op_libraries=[str(tmp_path / "libnope.so")]), UsageError,
            "libnope.so", "no such file")
    not_a_library = onnx.onnx_cpp2py_export.__file__  # a shared object without RegisterCustomOps
    monkeypatch.setenv(CUSTOM_OP_LIBRARIES_ENV, not_a_library)
    refused(lambda: _open(path), UsageError, "cannot load the custom-op library", not_a_library)
