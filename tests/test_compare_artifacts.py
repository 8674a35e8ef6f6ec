"""scripts/compare_artifacts.py: a copy is the same model; a changed weight is named, with the logits it moves; a
graph that differs only in its metadata is said to."""
import shutil
import sys
from pathlib import Path

import onnx
from onnx import numpy_helper

import optpipe

from .conftest import FUSED_INT4, tiny_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from compare_artifacts import compare  # noqa: E402


def _relist(path):
    import json

    from optpipe import artifact

    m = json.loads((path / "manifest.json").read_text())
    m.pop("files")
    m.pop("schema_version", None)
    artifact.write_manifest(path, m)


def test_a_copy_is_identical_and_a_changed_weight_is_named(tiny_llama, tmp_path):
    out = tmp_path / "a"
    try:
        optpipe.build(tiny_recipe(tiny_llama, FUSED_INT4), output=out, keep_rejected=True, log=lambda m: None)
    except optpipe.GateFailed:  # a busy machine may leave the speed gate inconclusive: the files are what matter
        out = tmp_path / "a.rejected"
    same = tmp_path / "same"
    shutil.copytree(out, same)
    r = compare(out, same, tokens=256, threads=1)
    assert r["files_identical"] and r["logits"] == {"positions": 256, "max_abs_diff": 0.0, "top1_flips": 0}

    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    model = onnx.load(str(changed / "model.onnx"))
    scale = next(t for t in model.graph.initializer if t.name.endswith("down_proj.scales"))
    values = numpy_helper.to_array(scale)
    scale.CopyFrom(numpy_helper.from_array((values * 3).astype(values.dtype), scale.name))
    model.metadata_props.add(key="optpipe.note", value="touched")
    onnx.save(model, str(changed / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    _relist(changed)  # as a rebuilt artifact's manifest would list its files (load refuses an unlisted size)
    r = compare(out, changed, tokens=256, threads=1)
    f = r["files"]["model.onnx"]
    assert not r["files_identical"] and f["initializers_changed"] == [scale.name]
    assert f["metadata_only_after"] == ["optpipe.note"] and f["graph_identical"]  # values moved, not structure
    assert r["logits"]["max_abs_diff"] > 1e-3

    meta_only = tmp_path / "meta"
    shutil.copytree(out, meta_only)
    model = onnx.load(str(meta_only / "model.onnx"))
    model.metadata_props.add(key="optpipe.note", value="only this")
    onnx.save(model, str(meta_only / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    _relist(meta_only)
    f = compare(out, meta_only, tokens=256, threads=1)["files"]["model.onnx"]
    assert f["graph_identical"] and f["initializers_changed"] == [] and f["metadata_only_after"] == ["optpipe.note"]
