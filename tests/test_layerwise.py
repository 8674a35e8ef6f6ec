"""optpipe.layerwise: the model one decoder layer at a time. The walk must see what the eager fp32 model computes
(each layer's inputs, the head's input), replaced weights must change exactly what they replace, and the int8
input rounding must be MatMulNBits accuracy_level 4's."""
import numpy as np
import pytest
import torch

from optpipe.checkpoint import LazyCheckpoint
from optpipe.layerwise import EffectiveWeight, Int8ActLinear, LayerStep, channel_absmax, walk

WINDOWS = [np.arange(3, 19), np.arange(40, 52)]


def _eager_inputs(path, modules):
    """Per module name (from the model's root): absmax per channel of its input over WINDOWS, from hooks on the
    eager transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stats = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, a, n=n: stats.__setitem__(n, channel_absmax(stats.get(n), a[0].reshape(-1, a[0].shape[-1]))))
        for n in modules]
    with torch.no_grad():
        for w in WINDOWS:
            model(torch.as_tensor(w).unsqueeze(0))
    for h in hooks:
        h.remove()
    return stats


def test_the_walk_sees_each_layers_inputs_as_the_eager_model_does(tiny_llama):
    ck = LazyCheckpoint.open(tiny_llama)
    eager = _eager_inputs(tiny_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"])
    seen = {}
    for step in walk(ck, WINDOWS, head=True):
        if step.is_head:
            seen["lm_head"] = step.observe({LayerStep.HEAD: None}, channel_absmax)[LayerStep.HEAD]
        elif step.index == 0:
            seen["model.layers.0.self_attn.q_proj"] = step.observe(
                {"q": step.module.self_attn.q_proj}, channel_absmax)["q"]
        else:  # a layer nobody observes is still run, so the next one sees its output
            seen["model.layers.1.mlp.down_proj"] = step.observe({"d": step.module.mlp.down_proj}, channel_absmax)["d"]
    for name, want in eager.items():
        torch.testing.assert_close(seen[name], want, rtol=1e-5, atol=1e-5, msg=name)


def test_a_replaced_weight_changes_its_layer_and_nothing_before_it(tiny_llama):
    """`effective` names weights as the ONNX graph does (fused names included): a fused q/k/v weight is split over
    q, k and v by rows; layer 0's inputs are unchanged and layer 1's change."""
    ck = LazyCheckpoint.open(tiny_llama)
    q, k, v = (ck.get(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv")
    fused = np.concatenate([q, k, 2 * v])  # doubles v: attention's output changes, its input does not
    effective = {"model.layers.0.self_attn.qkv_proj": EffectiveWeight(lambda: fused)}

    def inputs(eff):
        out = []
        for step in walk(ck, WINDOWS, effective=eff):
            if step.index == 0:
                layer_v = step.module.self_attn.v_proj.weight
            out.append(step.observe({"q": step.module.self_attn.q_proj}, channel_absmax)["q"])
        return out, layer_v

    (base0, base1), _ = inputs(None)
    (new0, new1), v_used = inputs(effective)
    torch.testing.assert_close(new0, base0, rtol=0, atol=0)
    assert not torch.allclose(new1, base1, atol=1e-4)
    np.testing.assert_array_equal(v_used.numpy(), 2 * v)
    bad = {"model.layers.0.self_attn.qkv_proj": EffectiveWeight(lambda: fused[:-1])}
    with pytest.raises(ValueError, match=r"v_proj: \[127, 64\] does not fit their \[64, 32, 32\] rows x 64"):
        next(walk(ck, WINDOWS, effective=bad))


def test_int8_input_rounding_is_per_block_symmetric():
    """Blocks of 4 along K, scale max|x|/127 each; an all-zero block stays zero (no division by zero)."""
    lin = torch.nn.Linear(8, 1, bias=False)
    lin.weight.data = torch.ones(1, 8)
    lin.__class__ = Int8ActLinear
    lin.act_block = 4
    x = torch.tensor([[1.0, 0.5, -0.25, 0.3, 0.0, 0.0, 0.0, 0.0]])
    q = torch.round(x[0, :4] * 127) / 127
    assert lin(x).item() == pytest.approx(q.sum().item(), abs=1e-6)
    assert q[3].item() != 0.3  # 0.3 is not on the grid: the rounding is real
    assert torch.isfinite(lin(torch.zeros(1, 8))).all()


def test_channel_absmax_keeps_the_running_maximum():
    a = channel_absmax(None, torch.tensor([[1.0, -3.0], [-2.0, 0.5]]))
    assert a.tolist() == [2.0, 3.0]
    assert channel_absmax(a, torch.tensor([[-5.0, 1.0]])).tolist() == [5.0, 3.0]
