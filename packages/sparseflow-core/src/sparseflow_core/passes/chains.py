"""Pass 3, chains: modules whose handler is of the ``"chains"`` stage (``nn.Conv2d``, ``handlers/conv2d.py``) get
their conv -> BatchNorm -> neuron chain fused, after the op handlers ran.

Input: the state after the op handlers. Output: the replaced convolutions in the model and in ``state.replaced``,
their fused neurons in ``state.fused_neurons``, their folded BatchNorms in ``report.folded``, a report entry for
each convolution considered, and in ``state.deferred`` the conv -> BN chains whose BatchNorm output goes into an
add (the residual pass takes them). :func:`settle_chains`, run after the residual, skip-add and sum-neuron passes,
drops the report entries of folded BatchNorms and installs the measured block size (``block_size="auto"``).
"""

from __future__ import annotations

from sparseflow_ops import SparseModule

from ..accounting import new_entry
from ..blocks import AUTO_CANDIDATES, install_auto_block_size
from ..handlers import HandlerContext
from ..registry import find_op_handler
from .state import OptimizeState


def fuse_chains(st: OptimizeState) -> None:
    an, opts = st.analysis, st.options
    for name, m in st.named.items():
        if isinstance(m, SparseModule):
            continue
        handler = find_op_handler(m)
        if handler is None or handler.stage != "chains":
            continue
        info = an.first(name)
        entry = new_entry(st.report, name, m, info, opts.filter_fn)
        if entry.reason:
            continue
        ctx = HandlerContext(st.model, an, name, None, opts.mode, state=st, entry=entry)
        new, _text = handler.replace(m, ctx)  # (the handler fills the entry)
        if new is not None:
            st.put(name, new)
            st.replaced[name] = new


def settle_chains(st: OptimizeState) -> None:
    rep = st.report
    # BatchNorms folded into a convolution: listed in rep.folded, not as layers the BatchNorm handler declined
    folded_bns = {b for b, _ in rep.folded}
    rep.layers[:] = [e for e in rep.layers if not (e.action == "left" and e.name in folded_bns)]
    for name in sorted(st.auto_names & set(st.replaced)):
        install_auto_block_size(st.replaced[name], st.replaced[name].block_size)
        entry = st.entry(name)
        entry.block_size = f"auto (default {entry.block_size})"
    if st.auto_names:
        rep.notes.append("block_size='auto': each replaced convolution times block sizes "
                         f"{', '.join(map(str, AUTO_CANDIDATES))} on its first CUDA call per input shape and keeps "
                         "the fastest; on the CPU (and during CUDA graph capture) the default rule is used")
