"""Pass 5, skip adds: ``neuron(bn(conv(x))) + identity`` (SEW-ResNet's ADD connection, a Transformer block's
``x + mlp(x)``): the add goes into the fused layer's epilogue (``residual_after``), by rewriting the block with fx.

Input: the fused layers with their neurons (the chains pass's convolutions, the handlers' 1x1 projections) and
the modules that take a skip connection's add themselves (``takes_skip_add``: Spikformer's attention, whose output
projection adds it in its epilogue), outside SparseFlow's own block modules (which add their skip connections
themselves). Each is looked for in the innermost block calling both the layer and its neuron (the module: its
parent); where that block returns the neuron's output (a Transformer's MLP), in the block around it, traced through
the inner one only. Output: the blocks whose adds moved into a fused layer run the rewritten graph
(``fx_fusion.FusedBlockForward``); the layers' report entries say so, or why an add stays separate (it broadcasts:
an identity of another shape); ``state.named`` taken afresh when a block was rewritten. Runs only with
``fuse=True``.
"""

from __future__ import annotations

from sparseflow_ops import SparseModule

from ..fx_fusion import (
    common_parent,
    fuse_module_skip_add,
    fuse_skip_add,
    install_fused_forward,
    rel_name,
    returns_only,
    through_paths,
    trace_block,
)
from .state import OptimizeState


def _owned(named: dict, name: str) -> bool:
    """Whether a module around ``name`` is a SparseFlow module (which runs, and adds, its children itself)."""
    parts = name.split(".")
    return any(isinstance(named.get(".".join(parts[:i])), SparseModule) for i in range(1, len(parts)))


def _blocks_with_skip_adds(st: OptimizeState) -> dict[str, list]:
    """{block name: [(layer name, neuron name)]} for the fused layers whose spikes may go into an add."""
    an, named = st.analysis, dict(st.model.named_modules())
    owner = {id(m): n for n, m in named.items()}
    by_block: dict[str, list] = {}
    for name, new in named.items():
        if not isinstance(new, SparseModule) or _owned(named, name):
            continue
        neuron = new.fused_neuron
        neuron_name = owner.get(id(neuron)) if neuron is not None else None
        if neuron_name is None and not new.takes_skip_add:
            continue
        shapes = an.add_broadcasts({c.out_root for c in an.calls.get(neuron_name or name, [])})
        if shapes:
            entry = st.entry(name)
            if entry is not None:
                entry.reason = "; ".join(r for r in (entry.reason, f"the add after {neuron_name or name} "
                                                     f"broadcasts ({shapes}): it stays a separate add") if r)
            continue
        parent = common_parent(name, neuron_name or name)
        if parent:
            by_block.setdefault(parent, []).append((name, neuron_name))
    return by_block


def _trace(block, parent: str, pairs) -> tuple:
    """The block's graph for fusing ``pairs``: traced through every submodule, else only through those on the way
    to the pairs' modules."""
    gm, _why = trace_block(block)
    if gm is None:
        gm, _why = trace_block(block, through_paths(*(rel_name(n, parent) for pair in pairs for n in pair if n)))
    return gm


def fuse_skip_adds(st: OptimizeState) -> None:
    if not st.options.fuse:
        return
    pending = _blocks_with_skip_adds(st)
    changed = False
    while pending:  # deepest blocks first
        parent = max(pending, key=lambda p: p.count("."))
        pairs = pending.pop(parent)
        block = st.model.get_submodule(parent)
        if any(m.training for m in block.modules()):
            continue  # (its forward is traced in eval mode only)
        gm = _trace(block, parent, pairs)  # (a block the residual pass rewrote: its graph)
        if gm is None:
            continue
        fused = []
        for name, neuron_name in pairs:
            rel = rel_name(name, parent)
            why = fuse_skip_add(block, gm, rel, rel_name(neuron_name, parent)) if neuron_name else \
                fuse_module_skip_add(block, gm, rel)
            if not why:
                fused.append((name, neuron_name))
                continue
            outer = parent.rpartition(".")[0]
            if outer and not isinstance(block, SparseModule) and returns_only(gm, rel_name(neuron_name or name,
                                                                                          parent)):
                pending.setdefault(outer, []).append((name, neuron_name))  # the add may be in the block around it
        if not fused:
            continue
        install_fused_forward(block, gm)
        changed = True
        for name, neuron_name in fused:
            entry = st.entry(name)
            if entry is not None:
                what = "after the neuron (in the epilogue)" if neuron_name else "after it"
                entry.detail = (entry.detail or "") + f"; + the skip connection's add {what}"
    if changed:
        st.refresh_named()
