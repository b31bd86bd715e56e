"""Pass 4, residual chains: ``neuron(bn(conv(x)) + identity)``, fused by rewriting their block's forward with fx.

Input: ``state.deferred`` (the conv -> BN chains whose BatchNorm output goes into an add, from the chains pass).
Output: each chain's convolution replaced by a SparseConv2d (in ``state.replaced``): fused with its BatchNorm,
the add and the neuron when the block's traced graph has that pattern (its block then runs the rewritten graph
where exact: ``fx_fusion.FusedBlockForward``; the block object stays), otherwise with only its BatchNorm folded
(the add and the neuron stay as they are, the report says why); ``state.named`` taken afresh.
"""

from __future__ import annotations

from sparseflow_ops import SparseConv2d, neuron_support

from ..blocks import dense_reason
from ..fx_fusion import common_parent, fuse_residual, install_fused_forward, rel_name, residual_neuron, trace_block
from ..hooks import module_hooks
from .state import OptimizeState, parent_and_child


def _why_not(st: OptimizeState, conv, bn_name, neuron, neuron_name) -> str:
    """Why the residual chain into ``neuron`` cannot run fused ('' when it can)."""
    an = st.analysis
    adapter, why = neuron_support(neuron)
    c_out, n_in = an.first(bn_name).out_shape, (an.first(neuron_name) or an.first(bn_name)).in_shape
    if adapter is None:
        return why
    if module_hooks(neuron):
        return f"neuron has {module_hooks(neuron)} hooks"
    if tuple(n_in) != tuple(c_out):
        return f"neuron sees a reshaped view {n_in} of {c_out}"
    if conv.dilation != (1, 1):
        return "dilated convolution"
    return an.residual_fed(bn_name, neuron_name)[1]


def _fuse_one(st, block, gm, parent, item, neuron_rel) -> str:
    """Fuse one chain into ``gm``: '' on success, else the reason (the model as it was)."""
    name, conv, bn, bn_name, bs, entry, _note = item
    neuron = block.get_submodule(neuron_rel)
    neuron_name = f"{parent}.{neuron_rel}"
    new = SparseConv2d.from_dense(conv, bn, neuron, block_size=bs, mode=st.options.mode)
    new.residual_chain = True  # called by the block's own forward (no residual): the conv alone
    holders = (parent_and_child(gm, rel_name(name, parent)), parent_and_child(st.model, name))
    for sub_parent, child in holders:
        setattr(sub_parent, child, new)
    res_gm, why = fuse_residual(block, gm, rel_name(name, parent), rel_name(bn_name, parent), neuron_rel)
    if res_gm is None:
        for sub_parent, child in holders:
            setattr(sub_parent, child, conv)
        new.to_dense()
        return why
    st.replaced[name] = new
    st.fused_neurons.add(neuron_name)
    st.report.folded.append((bn_name, name))
    entry.action, entry.detail = "fused", f"{new.kind()}+residual ({bn_name}, {neuron_name})"
    entry.reason = ""
    return ""


def _fold_only(st, item, why) -> None:
    """The fall-back: the convolution with its BatchNorm folded; the add and the neuron stay as they are."""
    name, conv, bn, bn_name, bs, entry, note = item
    if bs == "dense":
        entry.reason = f"{dense_reason(st.options.block_size, name, entry.in_shape[-2])}; {note}; residual: {why}"
        entry.block_size = None
        return
    new = SparseConv2d.from_dense(conv, bn, None, block_size=bs, mode=st.options.mode)
    st.put(name, new)
    st.replaced[name] = new
    st.report.folded.append((bn_name, name))
    entry.action, entry.detail, entry.reason = "sparse", f"conv+bn ({bn_name})", f"residual: {why}"


def fuse_residual_chains(st: OptimizeState) -> None:
    if not st.deferred:
        return
    by_block: dict[str, list] = {}
    for item in st.deferred:
        by_block.setdefault(common_parent(item[0], item[3]), []).append(item)
    # deepest blocks first: an outer block's trace then calls a rewritten inner block as one module
    for parent in sorted(by_block, key=lambda p: -p.count(".") - bool(p)):
        items = by_block[parent]
        gm = None
        block = st.model.get_submodule(parent) if parent else st.model
        trace_why = ""
        if parent and any(m.training for m in block.modules()):
            trace_why = "the block is in training mode (its forward is traced in eval mode)"
        elif parent:
            gm, trace_why = trace_block(block)
        for item in items:
            name, conv, _bn, bn_name = item[:4]
            why = "residual add in the model's top-level forward" if not parent else ""
            neuron_rel = residual_neuron(gm, rel_name(name, parent), rel_name(bn_name, parent)) if gm else None
            if not why and neuron_rel is None:
                why = trace_why or "the batchnorm output does not go through an add into a neuron"
            if not why:
                why = _why_not(st, conv, bn_name, block.get_submodule(neuron_rel), f"{parent}.{neuron_rel}")
            if not why:
                why = _fuse_one(st, block, gm, parent, item, neuron_rel)
                if not why:
                    continue
            _fold_only(st, item, why)
        if gm is not None and any(e[0] in st.replaced and st.replaced[e[0]].fused_neuron is not None for e in items):
            install_fused_forward(block, gm)
    st.refresh_named()
