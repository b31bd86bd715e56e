"""Pass 9, occupancy: fused layers whose spikes feed sparse consumers write the occupancy of their output, so the
consumers skip their own one-pass prescan (``write_occupancy=True``; opt-in: measured on the H100, the epilogue
write cost more than the consumer's prescan; see docs/design.md).

Input: ``state.replaced`` and ``state.named``. Output: ``write_occupancy`` set on those fused layers.
"""

from __future__ import annotations

from .state import OptimizeState


def _sparse_consumer(st: OptimizeState, name: str) -> bool:
    """Whether the module ``name`` reads an occupancy map: a sparse 3x3 / 1x1 SparseConv2d, or a handler-made
    module that says so with ``accepts_occupancy`` (depthwise / transposed convolutions)."""
    new = st.replaced.get(name)
    if new is not None and new.block_size not in ("dense", None) and new.kernel_size in ((3, 3), (1, 1)):
        return True
    return getattr(st.named.get(name), "accepts_occupancy", False)


def write_occupancy(st: OptimizeState) -> None:
    if not st.options.write_occupancy:
        return
    for new in st.replaced.values():
        if new.fused_neuron is None:
            continue
        neuron_name = next(n for n, mm in st.named.items() if mm is new.fused_neuron)
        info = st.analysis.first(neuron_name)
        consumers = {u.name for u in st.analysis.uses.get(info.out_root, []) if u.kind == "module"}
        if any(_sparse_consumer(st, c) for c in consumers):
            new.write_occupancy = True
