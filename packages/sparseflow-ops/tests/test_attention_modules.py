"""SparseSpikingSelfAttention, SparseSpikeDrivenSelfAttention and SparseMultiheadAttention against the
modules they replace: outputs over repeated calls (neuron state), reset_net, state_dict keys, the folded
projections, to_dense, and for MultiheadAttention masks, batch_first, unbatched inputs and the fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.layer.attention import SpikeDrivenSelfAttention, SpikingSelfAttention
from torch import nn

from sparseflow_ops import (
    SparseConv1d,
    SparseMultiheadAttention,
    SparseSpikeDrivenSelfAttention,
    SparseSpikingSelfAttention,
    is_bypassed,
)


def spikes(*shape, density=0.3):
    return (torch.rand(*shape) < density).float()


@torch.no_grad()
def firing_bns(module):
    """BatchNorm statistics that make the LIF neurons after them fire at a useful rate."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.01, 0.05)
            m.bias.uniform_(-0.3, 0.6)
    return module.eval()


def attn_lif_rates(module, x):
    """Mean input and output of attn_lif in one forward of ``module`` (to show the test is not trivial)."""
    seen = []
    h = module.attn_lif.register_forward_hook(lambda m, i, o: seen.append((i[0].abs().mean(), o.mean())))
    with torch.no_grad():
        module(x)
    h.remove()
    functional.reset_net(module)
    return seen[0]


@pytest.mark.parametrize("heads,C,L", [(2, 32, 23), (1, 16, 1), (4, 48, 37)], ids=["h2-L23", "h1-L1", "h4-C48-L37"])
def test_spikformer_ssa(heads, C, L):
    ssa = firing_bns(SpikingSelfAttention(C, num_heads=heads))
    functional.set_step_mode(ssa, "m")
    ref = copy.deepcopy(ssa)
    keys = list(ssa.state_dict())
    m = SparseSpikingSelfAttention.from_dense(ssa)
    assert isinstance(m, SpikingSelfAttention) and list(m.state_dict()) == keys
    assert isinstance(m.qkv_conv_bn[0], SparseConv1d) and is_bypassed(m.qkv_conv_bn[1])
    assert m.kind() == "ssa+qkv_conv_bn+proj_conv_bn"
    x = spikes(2, 2, C, L) * torch.randint(1, 3, (2, 2, C, L))  # residual sums: 0/1/2
    if L > 1:
        inp, out = attn_lif_rates(ref, x)
        assert inp > 0 and 0 < out < 1, "attention input/output trivial: the test would prove nothing"
    with torch.no_grad():
        for _ in range(2):  # neuron state carries over between calls
            y, r = m(x), ref(x)
            assert torch.equal(y, r)
            assert m.last_path == "sparse"
        functional.reset_net(m)
        functional.reset_net(ref)
        assert torch.equal(m(x), ref(x))
    back = m.to_dense()
    assert type(back) is SpikingSelfAttention and type(back.qkv_conv_bn[0]) is nn.Conv1d
    assert not is_bypassed(back.qkv_conv_bn[1]) and list(back.state_dict()) == keys
    functional.reset_net(back)
    functional.reset_net(ref)
    with torch.no_grad():
        assert torch.equal(back(x), ref(x))


def test_spikformer_ssa_only_proj_and_torch_mode():
    ssa = firing_bns(SpikingSelfAttention(32, num_heads=2))
    functional.set_step_mode(ssa, "m")
    ref = copy.deepcopy(ssa)
    m = SparseSpikingSelfAttention.from_dense(ssa, projections=["proj_conv_bn"], mode="torch")
    assert type(m.qkv_conv_bn[0]) is nn.Conv1d and isinstance(m.proj_conv_bn[0], SparseConv1d)
    x = spikes(2, 1, 32, 20)
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))
    assert m.last_path == "torch"
    with pytest.raises(ValueError, match="unknown projection"):
        SparseSpikingSelfAttention.from_dense(ref, projections=["q"])
    with pytest.raises(TypeError, match="SpikingSelfAttention"):
        SparseSpikingSelfAttention.from_dense(nn.Linear(2, 2))


@pytest.mark.autograd
def test_spikformer_ssa_training_runs_original_math():
    ssa = SpikingSelfAttention(16, num_heads=2)
    functional.set_step_mode(ssa, "m")
    ref = copy.deepcopy(ssa)
    m = SparseSpikingSelfAttention.from_dense(ssa)
    x = spikes(2, 2, 16, 9)
    y, r = m(x), ref(x)
    assert m.last_path == "torch" and y.requires_grad
    assert torch.allclose(y, r)


@pytest.mark.parametrize("heads,C,H,W", [(2, 32, 5, 7), (4, 16, 1, 1), (1, 24, 3, 3)], ids=["h2-5x7", "1px", "h1"])
def test_spike_driven_attention(heads, C, H, W):
    sd = firing_bns(SpikeDrivenSelfAttention(C, num_heads=heads))
    functional.set_step_mode(sd, "m")
    ref = copy.deepcopy(sd)
    keys = list(sd.state_dict())
    m = SparseSpikeDrivenSelfAttention.from_dense(sd)
    assert list(m.state_dict()) == keys and isinstance(m, SpikeDrivenSelfAttention)
    x = spikes(3, 2, C, H, W) * 3.0  # strong enough for shortcut_lif to fire
    if H * W > 1:
        inp, out = attn_lif_rates(ref, x)
        assert inp > 0 and out > 0, "attention input/output trivial"
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(m(x), ref(x))
            assert m.last_path == "sparse"
    back = m.to_dense()
    assert type(back) is SpikeDrivenSelfAttention and list(back.state_dict()) == keys


# ------------------------------------------------------------------------------------- MultiheadAttention
def mha_pair(E=32, heads=4, **kw):
    mha = nn.MultiheadAttention(E, heads, **kw).eval()
    return mha, SparseMultiheadAttention.from_dense(copy.deepcopy(mha))


def masks(B, L, S, kind):
    if kind == "none":
        return {}
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[:, -2:] = True
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    if kind == "key_padding":
        return {"key_padding_mask": kpm}
    if kind == "causal-bool":
        return {"attn_mask": causal}
    if kind == "float-3d+padding":
        am = torch.randn(B * 4, L, S)
        return {"attn_mask": am, "key_padding_mask": kpm.float().masked_fill(kpm, float("-inf"))}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["none", "key_padding", "causal-bool", "float-3d+padding"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_mha_self_attention(batch_first, kind):
    mha, m = mha_pair(batch_first=batch_first)
    B, L = 3, 11
    x = spikes(B, L, 32) if batch_first else spikes(L, B, 32)
    kw = masks(B, L, L, kind)
    with torch.no_grad():
        y, w = m(x, x, x, need_weights=False, **kw)
        r, _ = mha(x, x, x, need_weights=False, **kw)
    assert w is None and m.last_path == "sparse"
    assert torch.allclose(y, r, atol=1e-5), (y - r).abs().max()
    assert list(m.state_dict()) == list(mha.state_dict())


def test_mha_cross_attention_unbatched_and_no_bias():
    mha, m = mha_pair(E=24, heads=3, bias=False)
    q, kv = spikes(7, 24), spikes(9, 24)
    with torch.no_grad():
        y, _ = m(q, kv, kv, need_weights=False)
        r, _ = mha(q, kv, kv, need_weights=False)
    assert y.shape == (7, 24) and torch.allclose(y, r, atol=1e-5)


def test_mha_fallbacks_and_to_dense():
    mha, m = mha_pair()
    x = spikes(5, 2, 32)
    with torch.no_grad():
        y, w = m(x, x, x)  # need_weights=True: the module's own forward
        r, rw = mha(x, x, x)
    assert m.last_path == "torch" and torch.allclose(y, r) and torch.allclose(w, rw)
    assert "need_weights" in m.unsupported(need_weights=True)
    kd = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    assert "kdim" in SparseMultiheadAttention.unsupported(kd)
    assert "is_causal" in m.unsupported(is_causal=True)
    back = m.to_dense()
    assert type(back) is nn.MultiheadAttention and list(back.state_dict()) == list(mha.state_dict())
    with pytest.raises(TypeError, match="MultiheadAttention"):
        SparseMultiheadAttention.from_dense(nn.Linear(3, 3))
