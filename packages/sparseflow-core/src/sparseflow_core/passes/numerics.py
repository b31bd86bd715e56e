"""Pass 10, numerics: with ``numerics="faithful"`` every SparseFlow module computes as the dense model does; with
``"fast"``, a conv -> BN (folded) -> max pool chain leaves the folded bias to the pool.

Input: the model with its replacements, ``state.replaced``. Output: ``numerics="faithful"`` set on every
SparseFlow module (and a report note), or ``defer_shift`` set on the convolutions before a max pool (and their
report entries say so).
"""

from __future__ import annotations

from sparseflow_ops import SparseModule
from sparseflow_ops.pool import TritonMaxPool2d

from .state import OptimizeState


def _defer_shifts_to_pools(st: OptimizeState) -> None:
    """conv -> BN (folded) -> max pool: on its cuDNN paths the convolution leaves the folded bias to the pool,
    which adds it after the max (the same value; Spikformer's patch stem: no separate bias pass over the
    4x larger conv output)."""
    for bn_name, conv_name in st.report.folded:
        conv = st.replaced.get(conv_name)
        if conv is None or conv.fused_neuron is not None:
            continue
        user, _ = st.analysis.sole_user(bn_name)
        if user is not None and isinstance(st.named.get(user), TritonMaxPool2d):
            conv.defer_shift = True
            entry = st.entry(conv_name)
            if entry is not None:
                entry.detail = (entry.detail or "") + f"; bias added after the max pool {user}"


def set_numerics(st: OptimizeState) -> None:
    if not st.options.faithful:
        _defer_shifts_to_pools(st)
        return
    for m in st.model.modules():
        if isinstance(m, SparseModule):
            m.numerics = "faithful"
    st.report.notes.append("numerics='faithful': convolutions and BatchNorms run as in the dense model (unfolded "
                           "weights, its layouts); neurons, residual adds, max pools and attention products on "
                           "SparseFlow's kernels, with the dense model's fp32 results bit for bit")
