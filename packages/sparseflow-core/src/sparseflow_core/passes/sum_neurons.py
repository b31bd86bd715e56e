"""Pass 6, sum neurons: ``neuron(bn(conv(x)) + identity)`` where the neuron is elsewhere (MS-ResNet, pre-activation
ResNets: the sum is the residual stream, read by the next block's first neuron and by its skip connection). The
layer writing the sum does the add and computes that neuron's spikes in the same kernel
(``sparseflow_ops.link_sum_neuron``); the sum is still written for its other readers.

Input: ``state.deferred`` (conv -> BN chains whose BatchNorm output goes into an add) that the residual pass did not
fuse. The data flow comes from the analysis: every call of the BatchNorm goes into one add of two tensors of one
shape, whose sum one spiking neuron reads (as is, every call of it). The add must be in a block's forward (traced
with fx, as the residual pass does). Output: the convolution replaced by a SparseConv2d with its BatchNorm folded
(in ``state.replaced``), its block running the rewritten graph (``fx_fusion.fuse_sum``), the neuron in
``state.fused_neurons`` with a :class:`~sparseflow_ops.SumNeuronForward`; the layer's report entry names the
neuron, or says why it stays a separate kernel (``state.neuron_notes`` tells the neuron's entry too). Runs only
with ``fuse=True``, ``neurons=True`` and ``numerics="fast"``.
"""

from __future__ import annotations

from sparseflow_ops import SparseConv2d, link_sum_neuron, sum_neuron_support

from ..analyzer import ADD_FUNCTIONS
from ..fx_fusion import common_parent, fuse_sum, install_fused_forward, rel_name, trace_block
from ..hooks import module_hooks
from ..registry import is_spiking_module
from .state import OptimizeState, parent_and_child


def _in_place(fn: str) -> bool:
    return (fn.endswith("_") and not fn.startswith("_")) or fn.startswith("__i")


def sum_reader(st: OptimizeState, bn_name: str) -> tuple[str | None, str]:
    """(the neuron reading ``bn_name``'s output + another tensor, why it cannot take its spikes from the layer: '' when
    it can), or (None, why) when no one neuron reads the sum."""
    an = st.analysis
    calls = an.calls.get(bn_name) or []
    readers, sums, written = set(), set(), False
    for c in calls:
        uses = an.uses.get(c.out_root, [])
        adds = [f for f in an.fns if f.name in ADD_FUNCTIONS and c.out_root in f.in_roots]
        # (an add in place, ``out += identity``, leaves the sum in the BatchNorm's output: its readers use it too;
        # that nothing reads it before the add, the block's graph shows)
        if len(adds) != 1 or (len(uses) != 1 and adds[0].out_ids):
            return None, "the batchnorm output does not go only into one add"
        f = adds[0]
        if len(f.in_shapes) != 2 or f.in_shapes[0] != f.in_shapes[1]:
            return None, "the add broadcasts"
        root = f.out_ids[0] if f.out_ids else f.in_roots[0]
        written |= any(g is not f and g.in_roots[:1] == [root] and _in_place(g.name) for g in an.fns)
        sums.add(root)
        readers |= {u.name for u in an.uses.get(root, []) if u.kind == "module"
                    and is_spiking_module(st.model.get_submodule(u.name))}
    if not readers:
        return None, "no spiking neuron reads the sum"
    if len(readers) != 1:
        return None, f"several neurons read the sum ({', '.join(sorted(readers))})"
    neuron = readers.pop()
    if written:  # (checked here: under inference_mode a tensor's version does not tell)
        return neuron, "the sum is modified in place"
    n_calls = an.calls.get(neuron) or []
    if len(n_calls) != len(calls) or any(c.in_root not in sums for c in n_calls):
        return neuron, f"{neuron} is also called on other inputs: a module shared with another path is not fused"
    if any(c.in_shape != calls[0].out_shape for c in n_calls):
        return neuron, f"{neuron} reads a reshaped view of the sum"
    return neuron, ""


def _neuron_problem(st: OptimizeState, neuron_name: str) -> str:
    neuron = st.model.get_submodule(neuron_name)
    if st.options.filter_fn is not None and not st.options.filter_fn(neuron, neuron_name):
        return f"{neuron_name} is excluded by filter_fn"
    if module_hooks(neuron):
        return f"{neuron_name} has {module_hooks(neuron)} hooks"
    if neuron.training:
        return f"{neuron_name} is in training mode"
    why = sum_neuron_support(neuron)
    return f"{neuron_name}: {why}" if why else ""


def _producer(st: OptimizeState, item):
    """The SparseConv2d with the chain's BatchNorm folded (the one the residual pass put in, or a new one), or
    None when the convolution is something else by now."""
    name, conv, bn, _bn_name, bs = item[:5]
    cur = st.model.get_submodule(name)
    if isinstance(cur, SparseConv2d) and cur.folded_bn is bn and cur.fused_neuron is None:
        return cur, False
    if cur is conv:
        return SparseConv2d.from_dense(conv, bn, None, block_size=bs, mode=st.options.mode), True
    return None, False


def _note(st, item, neuron_name, why) -> None:
    """Why the layer ``item[0]`` does not compute the spikes of ``neuron_name``: in both report entries."""
    entry = item[5]
    entry.reason = "; ".join(r for r in (entry.reason, f"spikes of {neuron_name} not computed here: {why}") if r)
    st.neuron_notes[neuron_name] = f"not fused into {item[0]}: {why}"


def _fuse_one(st, block, gm, parent, item, neuron_name) -> str:
    name, _conv, _bn, bn_name, _bs, entry, _note_text = item
    new, fresh = _producer(st, item)
    if new is None:
        return "the convolution was replaced by another pass"
    holders = [parent_and_child(st.model, name)]
    if gm is not None:
        holders.append(parent_and_child(gm, rel_name(name, parent)))
    olds = [getattr(p, c) for p, c in holders]
    for p, c in holders:
        setattr(p, c, new)
    why = fuse_sum(block, gm, rel_name(name, parent), rel_name(bn_name, parent))
    if why:
        for (p, c), old in zip(holders, olds):
            setattr(p, c, old)
        if fresh:
            new.to_dense()
        return why
    link_sum_neuron(new, st.model.get_submodule(neuron_name))
    st.replaced[name] = new
    st.fused_neurons.add(neuron_name)
    if fresh:
        st.report.folded.append((bn_name, name))
        entry.block_size = new.block_size if new.block_size != "dense" else None
    entry.action = "fused"
    entry.detail = f"{new.kind()}+sum+neuron ({bn_name}, {neuron_name} reading the sum)"
    entry.reason = ""
    return ""


def fuse_sum_neurons(st: OptimizeState) -> None:
    if not (st.options.fuse and st.options.neurons) or st.options.faithful or not st.deferred:
        return  # (numerics="faithful": the neurons run in the dense modules' layout, on their own)
    by_block: dict[str, list] = {}
    for item in st.deferred:
        if item[5].action == "fused":
            continue
        neuron_name, why = sum_reader(st, item[3])
        if neuron_name is None or neuron_name in st.fused_neurons:
            continue  # (no neuron reads the sum, or the residual pass fused it with the other operand's chain)
        why = why or _neuron_problem(st, neuron_name)
        parent = common_parent(item[0], item[3])
        if not why and not parent:
            why = "the add is in the model's top-level forward"
        if why:
            _note(st, item, neuron_name, why)
            continue
        by_block.setdefault(parent, []).append((item, neuron_name))
    changed = False
    for parent in sorted(by_block, key=lambda p: -p.count(".")):
        block = st.model.get_submodule(parent)
        gm, why = (None, "the block is in training mode (its forward is traced in eval mode)") \
            if any(m.training for m in block.modules()) else trace_block(block)
        fused = False
        for item, neuron_name in by_block[parent]:
            if neuron_name in st.fused_neurons:  # (two sums read by one neuron: the first one takes it)
                _note(st, item, neuron_name, f"{neuron_name} runs fused elsewhere")
                continue
            err = why or _fuse_one(st, block, gm, parent, item, neuron_name)
            if err:
                _note(st, item, neuron_name, err)
            else:
                fused = True
        if fused:
            install_fused_forward(block, gm)
            changed = True
    if changed:
        st.refresh_named()
