"""Pass 7, neurons: spiking neurons that no layer runs fused are switched, in place, to the multi-step Triton
neuron kernel (``neurons=True``).

Input: ``state.named`` and ``state.fused_neurons`` after the chain passes. Output: the neurons accelerated
(``sparseflow_ops.accelerate_neuron``, the module objects stay), a report entry for each neuron considered
(``"neuron-kernel"``, or left with the reason). Neurons bypassed because a handler's module runs them fused are
reported by that module.
"""

from __future__ import annotations

from sparseflow_ops import accelerate_neuron, is_accelerated, is_bypassed, standalone_neuron_support

from ..registry import is_spiking_module
from ..report import LayerEntry, user_type
from .state import OptimizeState


def _problem(st: OptimizeState, name, m) -> str:
    if not st.options.neurons:
        return "neurons=False"
    if st.options.filter_fn is not None and not st.options.filter_fn(m, name):
        return "excluded by filter_fn"
    if st.analysis.first(name) is None:
        return "not called in the example forward"
    return ""


def accelerate_neurons(st: OptimizeState) -> None:
    for name, m in st.named.items():
        if not is_spiking_module(m) or name in st.fused_neurons or is_bypassed(m):
            continue
        entry = LayerEntry(name=name, type=user_type(m), action="left")
        st.report.add(entry)
        entry.reason = _problem(st, name, m)
        if entry.reason:
            continue
        adapter, why = standalone_neuron_support(m)
        if adapter is None:
            entry.reason = why
            continue
        if not is_accelerated(m):
            accelerate_neuron(m, preserve_layout=st.options.faithful)
        entry.action = "neuron-kernel"
        entry.detail = ("Triton neuron step (snnTorch's arithmetic)" if adapter.step_forward
                        else "multi-step Triton neuron")
        entry.reason = st.neuron_notes.get(name, "")
