"""Pass 5, skip adds: ``neuron(bn(conv(x))) + identity`` (SEW-ResNet's ADD connection): the add goes into the fused
layer's epilogue (``residual_after``), by rewriting the block with fx.

Input: ``state.replaced`` (the fused convolutions with their neurons). Output: the blocks whose adds moved into
a fused layer run the rewritten graph (``fx_fusion.FusedBlockForward``); the layers' report entries say so, or
why an add stays separate (it broadcasts: an identity of another shape); ``state.named`` taken afresh when a
block was rewritten. Runs only with ``fuse=True``.
"""

from __future__ import annotations

from ..fx_fusion import common_parent, fuse_skip_add, install_fused_forward, rel_name, trace_block
from .state import OptimizeState


def _blocks_with_skip_adds(st: OptimizeState) -> dict[str, list]:
    """{block name: [(conv name, neuron name)]} for the fused layers whose spikes may go into an add."""
    an, named = st.analysis, dict(st.model.named_modules())
    owner = {id(m): n for n, m in named.items()}
    by_block: dict[str, list] = {}
    for name, new in st.replaced.items():
        neuron = new.fused_neuron
        neuron_name = owner.get(id(neuron)) if neuron is not None else None
        if neuron_name is None:
            continue
        shapes = an.add_broadcasts({c.out_root for c in an.calls.get(neuron_name, [])})
        if shapes:
            entry = st.entry(name)
            if entry is not None:
                entry.reason = "; ".join(r for r in (entry.reason, f"the add after {neuron_name} broadcasts "
                                                     f"({shapes}): it stays a separate add") if r)
            continue
        parent = common_parent(name, neuron_name)
        if parent and name in named:
            by_block.setdefault(parent, []).append((name, neuron_name))
    return by_block


def fuse_skip_adds(st: OptimizeState) -> None:
    if not st.options.fuse:
        return
    by_block = _blocks_with_skip_adds(st)
    changed = False
    for parent in sorted(by_block, key=lambda p: -p.count(".")):
        block = st.model.get_submodule(parent)
        if any(m.training for m in block.modules()):
            continue  # (its forward is traced in eval mode only)
        gm, _why = trace_block(block)  # (a block the residual pass rewrote: its graph)
        if gm is None:
            continue
        fused = [name for name, neuron_name in by_block[parent]
                 if not fuse_skip_add(block, gm, rel_name(name, parent), rel_name(neuron_name, parent))]
        if not fused:
            continue
        install_fused_forward(block, gm)
        changed = True
        for name in fused:
            entry = st.entry(name)
            if entry is not None:
                entry.detail = (entry.detail or "") + "; + the skip connection's add after the neuron (in the epilogue)"
    if changed:
        st.refresh_named()
