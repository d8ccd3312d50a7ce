"""`camrt eval`'s randomization check on a file with LRP rule sets. The LRP rules keep constants derived
from the weights (their positive parts, for z+), which the randomized file cannot redo: the check is
refused for the LRP methods, in their records, and runs for the methods whose outputs do not read
those constants, with the same result as on a file exported without the LRP rule sets."""

from __future__ import annotations

import numpy as np
from lrp_oracle import RULE_SETS
from test_lrp_rules import SIZE, small_net

from camrt import contract


def _randomization_records(path: str, methods: list[str]) -> dict[tuple[str, str], dict]:
    from camrt.batch.evaluation import Evaluation

    rng = np.random.default_rng(0)
    images = [(f"img{i}", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(2)]
    evaluation = Evaluation(path, methods, ["randomization"], metric_options={"randomization": {"stages": 1}},
                            device="cpu")
    try:
        return {(r["method"], r["input"]): r for r in evaluation.run(images)}
    finally:
        evaluation.close()


def test_randomization_refuses_lrp_methods_and_runs_the_others(tmp_path):
    from camrt_exporters.export import export_torch, write_model

    paths = {}
    for name, rules in (("with-lrp", [contract.RULE_VANILLA, *RULE_SETS]), ("vanilla", [contract.RULE_VANILLA])):
        model, _ = export_torch(small_net(bias=True), input_size=(SIZE, SIZE), rules=rules)
        paths[name] = str(tmp_path / f"{name}.camrt.onnx")
        write_model(model, paths[name])
    records = _randomization_records(paths["with-lrp"], ["lrp-epsilon-plus-flat", "saliency"])
    alone = _randomization_records(paths["vanilla"], ["saliency"])
    for image in ("img0", "img1"):
        lrp = records[("lrp-epsilon-plus-flat", image)]
        assert lrp["status"] == "ok" and lrp["randomization_spearman"] is None
        assert "camrt_bwd/lrp-epsilon-plus-flat" in lrp["metric_errors"]["randomization"]
        assert "cannot run for this method" in lrp["metric_errors"]["randomization"]
        saliency = records[("saliency", image)]
        assert "metric_errors" not in saliency and saliency["randomization_spearman"] is not None
        assert saliency["randomization_spearman"] == alone[("saliency", image)]["randomization_spearman"]
