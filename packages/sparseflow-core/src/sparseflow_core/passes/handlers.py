"""Pass 2, op handlers: modules with a registered handler of the ``"handlers"`` stage (Linear, attention,
depthwise and transposed convolutions, max pools, spike-fed BatchNorms, ...), outermost first.

Input: the state after analysis. Output: those modules replaced in the model, a report entry for each module
considered (replaced, or left with the reason), ``report.folded`` for BatchNorms folded into a replacement, and
``state.named`` taken afresh. With ``numerics="faithful"`` only handlers whose modules give the dense result bit
for bit run.
"""

from __future__ import annotations

from torch.nn.utils import parametrize

from sparseflow_ops import SparseModule

from ..accounting import new_entry
from ..blocks import select_block_size
from ..handlers import HandlerContext
from ..hooks import module_hooks
from ..registry import find_op_handler, is_spiking_module
from .state import OptimizeState


def _first_inner_call(an, name):
    """A container module (an attention block) has no call record of its own: the first recorded call of a
    leaf inside it stands for its input (handlers of containers check spikes on their own children)."""
    prefix = name + "."
    return next((calls[0] for n, calls in an.calls.items() if n.startswith(prefix) and calls), None)


def run_handlers(st: OptimizeState) -> None:
    model, an, rep, opts = st.model, st.analysis, st.report, st.options
    done: list[str] = []
    snn = any(is_spiking_module(m) for m in model.modules())
    for name, m in list(model.named_modules()):
        if not name or isinstance(m, SparseModule) or any(name.startswith(d + ".") for d in done):
            continue
        handler = find_op_handler(m)
        if handler is None or handler.stage != "handlers":
            continue
        info = an.first(name) or _first_inner_call(an, name)
        entry = new_entry(rep, name, m, info, opts.filter_fn)
        if entry.reason:
            continue
        if info is None:
            entry.reason = "not called in the example forward"
            continue
        if not snn:  # a model without spiking neurons is left exactly as it is
            entry.reason = "no spiking modules in the model"
            continue
        if handler.needs_spikes:
            ok, why = an.spike_fed(name)
            if not ok:
                entry.reason = why
                continue
        if module_hooks(m):
            entry.reason = f"has {module_hooks(m)} hooks, which a replacement module would drop"
            continue
        if any(parametrize.is_parametrized(x) for x in m.modules()):
            entry.reason = ("parametrized weights (weight_norm / spectral_norm: computed from other tensors on "
                            "every call)")
            continue
        if opts.faithful and not handler.faithful:
            entry.reason = (f"numerics='faithful': left dense ({handler.name}: SparseFlow's kernel would sum in "
                            "another order than the dense op)")
            continue
        bs = st.block_for(name, info.in_shape) if len(info.in_shape or ()) >= 3 else opts.block_size
        if bs == "auto":  # handlers get the default rule (block_size="auto" is measured for convolutions)
            bs = select_block_size(info.in_shape[-2]) if len(info.in_shape or ()) >= 3 else None
        entry.block_size = bs if not isinstance(bs, dict) else None
        try:
            new, text = handler.replace(m, HandlerContext(model, an, name, entry.block_size, opts.mode))
        except (NotImplementedError, ValueError, TypeError) as e:
            new, text = None, f"{handler.name}: {e}"
        if new is None:
            entry.reason, entry.block_size = text, None
            continue
        st.put(name, new)
        bn = new.__dict__.get("_bn")
        bn_name = next((n for n, x in model.named_modules() if x is bn), None) if bn is not None else None
        if bn_name is not None:
            rep.folded.append((bn_name, name))
        if not handler.descend:
            done.append(name)
        entry.action, entry.detail = handler.action, text or handler.name
        if not handler.uses_blocks:
            entry.block_size = None
    st.refresh_named()
