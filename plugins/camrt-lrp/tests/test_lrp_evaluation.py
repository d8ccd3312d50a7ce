"""`camrt eval`'s randomization check on LRP files. The LRP rules derive their modified weights (W+,
W + gamma W+, BatchNorm folded) in the graph from the file's own weights, so the cascade's randomized
file gives the relevance of the randomized model: zennit on the torch net carrying the same random
weights is the oracle. `camrt eval` then scores the LRP methods' randomization check like any other's."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from lrp_oracle import RULE_SETS, assert_matches_zennit, run_file, sum_modules
from onnx import numpy_helper
from test_lrp_rules import SIZE, TARGETS, small_net

from camrt import contract


@pytest.fixture(scope="module")
def bias_free_file(tmp_path_factory):
    """The bias-free net, BatchNormalization kept (the plugin folds it in the graph): the file's weights are
    named after the torch parameters ("model." + name), so the randomized ones can be loaded back."""
    from camrt_exporters.export import export_torch, write_model

    net = small_net(bias=False)
    model, _ = export_torch(net, input_size=(SIZE, SIZE), rules=[contract.RULE_VANILLA, *RULE_SETS], fullgrad=True)
    path = tmp_path_factory.mktemp("lrp-random") / "net.camrt.onnx"
    write_model(model, path)
    return net, str(path)


def test_randomized_file_relevance_is_the_randomized_models(bias_free_file, tmp_path):
    from camrt.metrics.randomization import Cascade

    net, path = bias_free_file
    cascade = Cascade(path)
    (randomized,) = cascade.write_stages([len(cascade.layers)], str(tmp_path), seed=0)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(randomized).graph.initializer}
    random_net = copy.deepcopy(net)
    changed = 0
    with torch.no_grad():
        for name, parameter in random_net.named_parameters():
            value = weights.get(f"model.{name}")
            if value is not None and not np.array_equal(value, parameter.numpy()):
                parameter.copy_(torch.from_numpy(value.copy()))
                changed += 1
    assert changed == len(cascade.layers)  # every Conv and Linear weight, nothing else
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    outputs = run_file(onnx.load(randomized), x, TARGETS)
    for rule_set in RULE_SETS:
        with sum_modules([random_net[3]]):
            assert_matches_zennit(outputs[contract.input_gradient_output(rule_set)], random_net, x,
                                  outputs[contract.TARGET_INDEX_OUTPUT], rule_set, what=f"randomized {rule_set}")


def test_eval_scores_the_randomization_check_of_lrp_methods(bias_free_file):
    from camrt.batch.evaluation import Evaluation

    _, path = bias_free_file
    rng = np.random.default_rng(0)
    images = [(f"img{i}", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(2)]
    evaluation = Evaluation(path, [*RULE_SETS, "saliency"], ["randomization"],
                            metric_options={"randomization": {"stages": 1}}, device="cpu")
    try:
        records = list(evaluation.run(images))
    finally:
        evaluation.close()
    assert len(records) == 2 * (len(RULE_SETS) + 1)
    for record in records:
        assert record["status"] == "ok" and "metric_errors" not in record, record
        assert record["randomization_spearman"] is not None
