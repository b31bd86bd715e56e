"""What every drop-in shares through ``SparseModule``: numerics="faithful" takes the dense module's exact path,
the path choice (faithful, then a forced ``mode``, then the eager path under tracing, then measurement), and
copies / pickles that keep the parameters and rebuild the caches."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sparseflow_ops.batchnorm as obn
import sparseflow_ops.conv_transpose as oct_
import sparseflow_ops.depthwise as odw
import sparseflow_ops.linear as ol
from sparseflow_ops import (
    SparseBatchNorm2d,
    SparseConv1d,
    SparseConv2d,
    SparseConvTranspose2d,
    SparseGroupedConv2d,
    SparseLinear,
    SparseModule,
)


@torch.no_grad()
def random_bn(kind, c):
    bn = kind(c).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.normal_()
    return bn


def _linear():
    return nn.Linear(24, 10), random_bn(nn.BatchNorm1d, 10), torch.randn(6, 24)


def _grouped():
    return nn.Conv2d(8, 16, 3, 1, 1, groups=8), random_bn(nn.BatchNorm2d, 16), torch.randn(2, 8, 6, 7)


def _transposed():
    return nn.ConvTranspose2d(16, 8, 3, 2, 1, 1), random_bn(nn.BatchNorm2d, 8), torch.randn(1, 16, 4, 5)


# name -> (dense layer, BatchNorm it feeds, non-binary input), drop-in class, module whose kernel launcher is poisoned
FOLDING = {
    "linear": (_linear, SparseLinear, ol, "sparse_linear"),
    "grouped": (_grouped, SparseGroupedConv2d, odw, "grouped_conv2d"),
    "transposed": (_transposed, SparseConvTranspose2d, oct_, "sparse_conv_transpose2d"),
}


@pytest.mark.parametrize("name", list(FOLDING))
def test_faithful_runs_the_dense_layer_and_its_batchnorm(name, monkeypatch):
    """numerics="faithful" (as ``optimize(..., numerics="faithful")`` sets it) on a drop-in with a folded BatchNorm:
    the dense layer's arithmetic and the BatchNorm module on its own, bit for bit the dense result, no kernel
    launched, even with ``mode="sparse"`` forcing the kernel; with fast numerics the same module runs the kernel."""
    build, cls, mod, launcher = FOLDING[name]
    layer, bn, x = build()
    ref = copy.deepcopy(bn)(copy.deepcopy(layer).eval()(x))
    m = cls.from_dense(layer.eval(), bn, mode="sparse")
    fast = bn(m(x))
    assert m.last_path == "sparse" and (fast - ref).abs().max() < 1e-4
    m.numerics = "faithful"
    monkeypatch.setattr(mod, launcher, lambda *a, **k: pytest.fail("kernel launched under faithful numerics"))
    y = bn(m(x))
    assert m.last_path == "torch"
    assert torch.equal(y, ref)


def test_faithful_batchnorm_is_the_dense_module(monkeypatch):
    """SparseBatchNorm2d under numerics="faithful": ``nn.BatchNorm2d``'s own forward, bit for bit."""
    bn = random_bn(nn.BatchNorm2d, 16)
    x = torch.randn(2, 16, 5, 6)
    ref = copy.deepcopy(bn)(x)
    m = SparseBatchNorm2d.from_dense(bn, mode="sparse")
    m(x)
    assert m.last_path == "kernel"
    m.numerics = "faithful"
    monkeypatch.setattr(obn, "batch_norm_affine", lambda *a, **k: pytest.fail("kernel launched under faithful"))
    y = m(x)
    assert m.last_path == "torch" and torch.equal(y, ref)


def test_choose_order(monkeypatch):
    """``SparseModule._choose``: faithful numerics take the exact candidate, then a forced mode (mapped, else the
    default), then under tracing the eager path, else the measured dispatch; the choice is remembered."""
    import sparseflow_kernels.dispatch as kd

    m = SparseLinear(8, 4)
    cands = {"sparse": None, "dense": None, "torch": None}
    x = torch.randn(2, 8)
    monkeypatch.setattr(kd, "choose", lambda key, cands, fallback, device=None: "dense")
    assert m._choose("k", cands, x) == "dense" and m.last_path == "dense"
    assert m._choose("k", cands, x, traced=True) == "dense"  # the path chosen eagerly
    m.last_path = None
    assert m._choose("k", cands, x, traced=True) == "sparse"  # nothing measured yet: the fallback
    m.mode = "torch"
    assert m._choose("k", cands, x) == "torch"
    assert m._choose("k", {"sparse": None, "dense": None}, x) == "dense"  # not offered: the default
    assert m._choose("k", cands, x, forced={"torch": "sparse"}) == "sparse"
    m.numerics = "faithful"
    assert m._choose("k", cands, x, exact="torch", forced={"torch": "sparse"}) == "torch"
    assert m._choose("k", {"sparse": None}, x, exact="torch", default="sparse") == "sparse"  # no exact offered


def _drop_ins():
    conv, bn2 = nn.Conv2d(4, 8, 3, padding=1).eval(), random_bn(nn.BatchNorm2d, 8)
    lin, bn1 = nn.Linear(12, 6).eval(), random_bn(nn.BatchNorm1d, 6)
    c1 = nn.Conv1d(12, 6, 1).eval()
    return {
        "conv2d+bn": (SparseConv2d.from_dense(conv, bn2), bn2, torch.randn(2, 4, 5, 5)),
        "linear+bn": (SparseLinear.from_dense(lin, bn1), bn1, torch.randn(3, 12)),
        "conv1d": (SparseConv1d.from_dense(c1), None, torch.randn(2, 12, 5)),
        "grouped": (SparseGroupedConv2d.from_dense(nn.Conv2d(4, 8, 3, groups=2).eval()), None,
                    torch.randn(1, 4, 5, 5)),
        "transposed": (SparseConvTranspose2d.from_dense(nn.ConvTranspose2d(4, 8, 2, 2).eval()), None,
                       torch.randn(1, 4, 3, 3)),
        "batchnorm": (SparseBatchNorm2d.from_dense(random_bn(nn.BatchNorm2d, 4)), None, torch.randn(2, 4, 3, 3)),
    }


@pytest.mark.parametrize("name", ["conv2d+bn", "linear+bn", "conv1d", "grouped", "transposed", "batchnorm"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_parameters_and_rebuild_caches(name, how):
    """A deepcopy or pickle round trip of a drop-in (with its folded BatchNorm) computes what the original does;
    its caches come back empty (keys None), its runtime state (``_pending``, ``last_path``) present, and
    ``to_dense`` of the copy carries none of the drop-in's own attributes."""
    m, bn, x = _drop_ins()[name]
    seq = nn.Sequential(m, bn) if bn is not None else m
    ref = seq(x)
    if how == "deepcopy":
        seq2 = copy.deepcopy(seq)
    else:
        buf = io.BytesIO()
        torch.save(seq, buf)
        buf.seek(0)
        seq2 = torch.load(buf, weights_only=False)
    m2 = seq2[0] if bn is not None else seq2
    assert isinstance(m2, SparseModule) and "_pending" in m2.__dict__
    assert all(not m2.__dict__[c].entries for c in m2._caches)
    assert torch.equal(seq2(x), ref)
    dense = m2.to_dense()
    assert not isinstance(dense, SparseModule)
    assert not set(dense.__dict__) & set(m2._runtime) - {"step_mode"}


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
def test_faithful_multihead_attention_is_the_dense_module(batch_first):
    """SparseMultiheadAttention under numerics="faithful" runs ``nn.MultiheadAttention``'s own forward: bit for bit
    the dense result (batch-first self-attention takes the dense module's fused fast path, whose rounding the
    sparse projections + SDPA do not reproduce)."""
    from sparseflow_ops import SparseMultiheadAttention

    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    ref_mha = copy.deepcopy(mha)
    m = SparseMultiheadAttention.from_dense(mha)
    m.numerics = "faithful"
    for _ in range(3):
        q = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
        y = m(q, q, q, need_weights=False)[0]
        assert m.last_path == "torch"
        assert torch.equal(y, ref_mha(q, q, q, need_weights=False)[0])


def _drop_in_classes():
    import sparseflow_ops.pool  # noqa: F401 (the pool drop-in is not re-exported)

    seen, todo = [], list(SparseModule.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo += cls.__subclasses__()
    return sorted((c for c in seen if not c.__subclasses__()), key=lambda c: c.__qualname__)


@pytest.mark.parametrize("cls", _drop_in_classes(), ids=lambda c: c.__qualname__)
def test_every_drop_in_names_its_kind(cls):
    """``kind()`` (what the report and the kernel profile print for a module) is defined on every drop-in: its
    own ``kind`` or a ``_kind`` (a name, or a property naming the variant) for ``SparseModule.kind``."""
    own = {n for c in cls.__mro__ if c is not SparseModule for n in vars(c)}
    assert "kind" in own or isinstance(getattr(cls, "_kind", None), (str, property)), cls


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 11), min_size=1, max_size=40))
def test_version_cache_keeps_the_variants_it_hands_out(keys):
    """The caches of derived tensors (packed weights, folded affines) keep up to ``MAX_ENTRIES`` variants: a value
    once handed out stays the same object while no more than that many other keys came since its last use (a CUDA
    graph captured with one packing keeps reading it while another batch size runs another), and each key is
    computed again only after it was dropped."""
    from sparseflow_ops._common import VersionCache

    cache, computed, handed = VersionCache(), [], {}
    for i, k in enumerate(keys):
        v = cache.get(k, lambda k=k: computed.append(k) or object())
        last = max((j for j in range(i) if keys[j] == k), default=None)
        if last is not None and len(set(keys[last + 1:i]) - {k}) < VersionCache.MAX_ENTRIES:
            assert v is handed[k]  # kept: the same tensor a graph may hold
        handed[k] = v
        assert len(cache.entries) <= VersionCache.MAX_ENTRIES
    assert set(computed) == set(keys) and len(computed) <= len(keys)
    if len(set(keys)) <= VersionCache.MAX_ENTRIES:
        assert sorted(computed) == sorted(set(keys))  # each variant computed once


@pytest.mark.parametrize("in_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("multistep", [True, False])
def test_neuron_off_the_kernels_gets_its_membrane_in_the_dense_layout(in_layout, multistep):
    """A fused layer's neuron keeps the membrane the kernels wrote (channels innermost). Run through its own forward
    (training, hooks, CPU), it first takes that membrane in the layout the dense neuron gives it, its input step's:
    the same values, and the outputs laid out as the dense model's."""
    from spikingjelly.activation_based import neuron

    from sparseflow_ops.neurons import find_adapter

    torch.manual_seed(0)
    sn = neuron.LIFNode(tau=2.0, step_mode="m" if multistep else "s")
    dense = copy.deepcopy(sn)
    v = torch.randn(2, 3, 4, 5)
    sn.v = v.contiguous(memory_format=torch.channels_last)  # as the fused kernels store it
    dense.v = v.clone()
    x = torch.randn(3, 2, 3, 4, 5) if multistep else torch.randn(2, 3, 4, 5)
    if in_layout == "channels_last":
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape) if multistep else \
            x.contiguous(memory_format=torch.channels_last)
        dense.v = dense.v.contiguous(memory_format=torch.channels_last)
    find_adapter(sn).restore_layout(sn, x)
    step = x[0] if multistep else x
    assert sn.v.stride() == step.stride() and torch.equal(sn.v, v)
    with torch.no_grad():
        y, ref = sn(x), dense(x)
    assert torch.equal(y, ref) and y.stride() == ref.stride()
    assert torch.equal(sn.v, dense.v) and sn.v.stride() == dense.v.stride()
