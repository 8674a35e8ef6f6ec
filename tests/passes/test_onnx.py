"""The ONNX graph helpers every ONNX pass edits through (passes/_onnx.py): GraphEdit, toposort, opsets, metadata, ranks."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optpipe.passes._onnx import (
    GraphEdit,
    consumers,
    ensure_opset,
    metadata,
    producers,
    set_metadata,
    tensor_ranks,
    toposort,
)
from optpipe.runtime.ort_decoder import session_options


def _chain() -> onnx.ModelProto:
    """y = (x @ W1) @ W2, nodes stored out of order."""
    w1 = numpy_helper.from_array(np.eye(2, dtype=np.float32) * 2, "W1")
    w2 = numpy_helper.from_array(np.eye(2, dtype=np.float32) * 3, "W2")
    second = helper.make_node("MatMul", ["h", "W2"], ["y"], name="second")
    first = helper.make_node("MatMul", ["x", "W1"], ["h"], name="first")
    graph = helper.make_graph([second, first], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), session_options(1, optimize=False),
                                providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def test_toposort_orders_producers_first_and_names_unresolved_inputs():
    model = _chain()
    toposort(model)
    assert [n.name for n in model.graph.node] == ["first", "second"]
    assert producers(model)["h"].name == "first" and [n.name for n in consumers(model)["h"]] == ["second"]
    model.graph.node.append(helper.make_node("Add", ["y", "nowhere"], ["z"], name="dangling"))
    with pytest.raises(ValueError, match=r"unresolved inputs: \['nowhere'\]"):
        toposort(model)


def test_graph_edit_replaces_a_node_keeps_still_read_initializers_and_resorts():
    model = _chain()
    edit = GraphEdit(model)
    second = next(n for n in model.graph.node if n.name == "second")
    # replace `second` by h @ (W2 * 5), added before its producer; drop W2 (unread afterwards) and W1 (still read)
    edit.remove.add(id(second))
    edit.new_inits.append(numpy_helper.from_array(edit.array("W2") * 5, "W2x5"))
    edit.new_nodes.append(helper.make_node("MatMul", ["h", "W2x5"], ["y"], name="second_x5"))
    edit.drop_inits |= {"W1", "W2"}
    edit.commit()
    assert [n.name for n in model.graph.node] == ["first", "second_x5"]
    assert sorted(t.name for t in model.graph.initializer) == ["W1", "W2x5"]
    np.testing.assert_allclose(_run(model, np.array([[1.0, 2.0]], np.float32)), [[30.0, 60.0]])


def test_graph_edit_concatenates_initializers():
    model = _chain()
    joined = GraphEdit(model).concat("W12", ["W1", "W2"], axis=1)
    np.testing.assert_array_equal(numpy_helper.to_array(joined), [[2, 0, 3, 0], [0, 2, 0, 3]])


def test_opsets_only_rise_and_metadata_keys_use_dots():
    model = _chain()
    ensure_opset(model, "", 17)
    ensure_opset(model, "com.microsoft", 1)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21), ("com.microsoft", 1)}
    set_metadata(model, optpipe__kv_cache="static", optpipe__max_length=64)
    set_metadata(model, optpipe__max_length=128)
    assert metadata(model) == {"optpipe.kv_cache": "static", "optpipe.max_length": "128"}


def test_tensor_ranks_follow_declared_ranks_and_never_guess():
    """Ranks flow from declarations through known ops (Gather adds the ids' rank, broadcasting takes the largest);
    an op of another domain, a MatMul with a vector, or an op the table does not know leaves its output unknown."""
    v, h = 10, 4
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]),
             helper.make_node("Mul", ["gamma", "x"], ["xn"]),
             helper.make_node("MatMul", ["xn", "w"], ["y"]),
             helper.make_node("MatMul", ["xn", "vec"], ["dot"]),
             helper.make_node("Attention", ["y"], ["custom"], domain="optpipe"),
             helper.make_node("Transpose", ["y"], ["t"]),
             helper.make_node("Split", ["y"], ["y0", "y1"], axis=-1, num_outputs=2)]
    inits = [numpy_helper.from_array(np.zeros((v, h), np.float32), "emb"),
             numpy_helper.from_array(np.ones(h, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros((h, 2), np.float32), "w"),
             numpy_helper.from_array(np.zeros(h, np.float32), "vec")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])], [],
                              inits)
    ranks = tensor_ranks(helper.make_model(graph))
    assert {k: ranks.get(k) for k in ("x", "xn", "y", "y0", "y1", "dot", "custom", "t")} == {
        "x": 3, "xn": 3, "y": 3, "y0": 3, "y1": 3, "dot": None, "custom": None, "t": None}
