"""Pass 11, report: the report accounts for every compute layer and reads in model order.

Input: the state after every other pass. Output: ``state.report`` complete: an entry for each convolution /
linear layer no pass reported, the reasons of BatchNorms left unfolded, the layers sorted in model order, and a
note when nothing changed.
"""

from __future__ import annotations

from ..accounting import account_compute_layers, explain_unfolded_bns
from .state import OptimizeState


def finish_report(st: OptimizeState) -> None:
    rep = st.report
    account_compute_layers(st.model, st.analysis, rep)
    explain_unfolded_bns(rep)
    rep.layers.sort(key=lambda e: st.order.get(e.name, len(st.order)))  # the model's order
    if not rep.replaced and not rep.by_action("neuron-kernel"):
        rep.notes.append("no layer consumes spikes in a supported way: model unchanged")
