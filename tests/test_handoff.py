"""The typed hand-off from passes to targets: what the manifest reads from it."""
from optpipe.handoff import Handoff, KVCacheLayout


def test_quantized_summary_counts_weights_per_scheme_in_a_stable_order():
    h = Handoff()
    h.quantized.update({"l0.q": "int4-g32-asym", "l0.k": "int4-g32-asym", "lm_head": "int8-channel-sym"})
    assert h.quantized_summary() == {"int4-g32-asym": 2, "int8-channel-sym": 1}
    assert list(h.quantized_summary()) == sorted(h.quantized_summary())
    assert Handoff().quantized_summary() == {}


def test_kv_cache_layout_records_a_length_only_when_static():
    assert KVCacheLayout().as_dict() == {"mode": "dynamic"}
    assert KVCacheLayout("dynamic", 512).as_dict() == {"mode": "dynamic"}
    assert KVCacheLayout("static", 2048).as_dict() == {"mode": "static", "max_length": 2048}
    a, b = Handoff(), Handoff()
    a.fused_projections.append(("l0", "qkv_proj", ("q_proj", "k_proj", "v_proj")))
    assert b.fused_projections == []  # no state shared between builds
