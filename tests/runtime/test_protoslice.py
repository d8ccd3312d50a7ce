"""Opening a camrt file without parsing its weights (`camrt.modelfile.slicing`).

Oracle: onnx itself. The bytes made for a pruned subgraph parse (with onnx) into the same model as
the pruned subgraph of the file loaded whole by `onnx.load`; a file with external data falls back
to `onnx.load` and runs the same.
"""

from __future__ import annotations

import numpy as np

from camrt import contract


def test_sliced_subgraph_bytes_equal_the_whole_file_pruned(tiny):
    import onnx

    from camrt.execution.subgraphs import subgraph
    from camrt.modelfile.slicing import SlicedModel

    fetch = sorted([contract.LOGITS_OUTPUT, contract.TARGET_INDEX_OUTPUT, contract.gradient_output("feat")])
    sliced = SlicedModel(tiny.path)
    assert len(sliced.model.graph.initializer) == 0 and sliced.initializers
    got = onnx.load_from_string(sliced.serialize(subgraph(sliced.model, fetch)))
    want = subgraph(onnx.load(tiny.path), fetch)
    assert {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in got.graph.initializer} == \
           {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in want.graph.initializer}
    del got.graph.initializer[:], want.graph.initializer[:]
    assert got == want


def test_external_data_file_falls_back_to_onnx_load(tiny, tmp_path, rng):
    import onnx

    from camrt.execution.session import ExplainSession

    external = tmp_path / "external.camrt.onnx"
    onnx.save(onnx.load(tiny.path), external, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    x = rng.standard_normal((2, 3, 12, 16)).astype(np.float32)
    fetch = [contract.LOGITS_OUTPUT, contract.gradient_output("feat")]
    inline = ExplainSession(tiny.path, device="cpu")
    fallback = ExplainSession(str(external), device="cpu")
    assert inline._sliced is not None and fallback._sliced is None
    a, b = inline.run(x, [-1, 2], fetch), fallback.run(x, [-1, 2], fetch)
    for name in fetch:
        np.testing.assert_array_equal(a[name], b[name])
