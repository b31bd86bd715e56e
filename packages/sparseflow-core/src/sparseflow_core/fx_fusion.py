"""Fusing ``neuron(bn(conv(x)) + identity)`` (the residual chains of ResNet blocks),
``neuron(bn(conv(x))) + identity`` (SEW-ResNet's ADD connection, :func:`fuse_skip_add`) and ``bn(conv(x)) + identity``
read by a neuron elsewhere (MS-ResNet's residual stream, :func:`fuse_sum`).

The residual add sits in the block's own ``forward`` (``out += identity``), between the BatchNorm and the
neuron, so the chain cannot be fused by swapping modules alone. The block (the innermost module that
calls all three) is traced with ``torch.fx`` (the analyzer's leaf modules stay leaves); in its graph the
pattern ``conv -> bn -> add(·, identity) -> neuron``, where each value has that single use, becomes one
call of the fused module with ``residual=identity``, placed where the add was. The block stays the user's
object (class, methods, children, ``state_dict`` keys, ``reset_net``): :class:`FusedBlockForward`, installed as
its instance ``forward``, runs the rewritten graph with the block as ``self`` while that is exact, and the block's
own ``forward`` otherwise. Blocks that do not trace, whose forward sets attributes, or whose graph does not match,
are left alone with the reason.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .registry import is_leaf, is_spiking_module

_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}


class _LeafTracer(fx.Tracer):
    """The analyzer's leaf modules stay leaves; with ``through`` (qualified names in the block), so does every
    module not named there. ``inlined``: the modules whose forward the trace went through."""

    def __init__(self, through: frozenset | None = None):
        super().__init__()
        self.through = through
        self.inlined: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # (a block already rewritten is called as a module: its FusedBlockForward decides at run time)
        leaf = is_leaf(m) or is_fused_block(m) or super().is_leaf_module(m, qualname) or (
            self.through is not None and qualname not in self.through)
        if not leaf and qualname not in self.inlined:
            self.inlined.append(qualname)
        return leaf


_SIMPLE = (bool, int, float, str, type(None))
_MISSING = object()
_INLINED = "sparseflow_inlined"  # (GraphModule.meta key: the modules a trace went through)


class FusedBlockForward:
    """Instance ``forward`` of a block whose chains run as fused layers (see the module docstring).

    ``gm`` is the block traced with torch.fx, its chains rewritten into calls of the fused layers; its code runs
    with the block itself as ``self`` (the block's own children, parameters and attributes), only while that is
    exactly what the block's forward computes:

    * every module of the block is in eval mode (the trace froze ``self.training``; training-mode BatchNorms use
      batch statistics and update their running ones; dropout is active);
    * the plain attributes (bools, numbers, strings, None) of the block and of the modules whose forward the trace
      went through hold their traced values (a forward branching on them was frozen by the trace);
    * no module of a fused chain has a hook, and no global module hook is registered (the fused call would hand
      the hooks other values, or skip the modules).

    Otherwise the block's own ``forward`` runs: the fused layers in it then run their convolution alone, and the
    BatchNorms, adds and neurons run as the block calls them. The checks are a few attribute and dictionary
    look-ups per call; under ``torch.compile`` they become guards, and a CUDA graph captures the path taken.
    """

    def __init__(self, block: nn.Module, gm: fx.GraphModule):
        self.block = block
        self.gm = gm
        self.modules = tuple(block.modules())
        traced = (block, *(block.get_submodule(q) for q in gm.meta.get(_INLINED, ())))
        self.state = tuple((m, k, v) for m in traced for k, v in m.__dict__.items()
                           if k != "training" and type(v) in _SIMPLE)
        self.layers: tuple = ()

    def set_layers(self) -> None:
        """The fused layers the graph calls with a residual (they run the block's chains)."""
        targets = {n.target for n in self.gm.graph.nodes if n.op == "call_module" and "residual" in n.kwargs}
        self.layers = tuple(self.block.get_submodule(t) for t in sorted(targets))

    def exact(self) -> bool:
        """Whether the rewritten graph computes what the block's own forward would, now."""
        for m in self.modules:
            if m.training:
                return False
        for m, k, v in self.state:
            cur = getattr(m, k, _MISSING)
            if cur is not v and cur != v:
                return False
        return not any(layer.chain_hooked() for layer in self.layers)

    def __call__(self, *args, **kwargs):
        block = self.block
        if self.exact():
            return type(self.gm).forward(block, *args, **kwargs)
        return type(block).forward(block, *args, **kwargs)


def is_fused_block(m: nn.Module) -> bool:
    return isinstance(m.__dict__.get("forward"), FusedBlockForward)


def fused_forward(m: nn.Module) -> FusedBlockForward | None:
    """The :class:`FusedBlockForward` installed on ``m``, or None."""
    fwd = m.__dict__.get("forward")
    return fwd if isinstance(fwd, FusedBlockForward) else None


def install_fused_forward(block: nn.Module, gm: fx.GraphModule) -> FusedBlockForward:
    """Run ``gm`` (the rewritten trace of ``block``) as ``block``'s forward where exact (see FusedBlockForward)."""
    fwd = fused_forward(block)
    if fwd is None or fwd.gm is not gm:
        fwd = FusedBlockForward(block, gm)
        block.forward = fwd
    fwd.set_layers()
    return fwd


def remove_fused_forward(block: nn.Module) -> None:
    if is_fused_block(block):
        del block.__dict__["forward"]


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    if node.op == "call_method":
        return node.target in _ADDS
    return False


def _sole_add(node: fx.Node, what: str) -> tuple:
    """The add that alone uses ``node`` (``node + other`` or ``other + node``, ``node`` once) and its other operand,
    with '', or (None, None, the reason); ``what`` names ``node``'s value in that reason."""
    users = list(node.users)
    if len(users) != 1 or not _is_add(users[0]):
        return None, None, f"{what} does not go only to an add"
    add = users[0]
    if add.kwargs or len(add.args) != 2 or add.args.count(node) != 1:
        return None, None, "unexpected add signature"
    other = add.args[1] if add.args[0] is node else add.args[0]
    if not isinstance(other, fx.Node):
        return None, None, "the other operand of the add is not a tensor of the graph"
    return add, other, ""


def _layer_and(gm: fx.GraphModule, conv_rel: str, rel: str, what: str) -> tuple:
    """The call nodes of the layer ``conv_rel`` (called on its input alone) and of the module ``rel`` (a ``what``) in
    ``gm``, with '', or (None, None, the reason)."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    conv, node = nodes.get(conv_rel), nodes.get(rel)
    if conv is None or node is None:
        return None, None, f"conv or {what} not called directly in the block's forward"
    if conv.kwargs or len(conv.args) != 1:
        return None, None, "the layer is called with more than its input"
    return conv, node, ""


def _rewrite(block: nn.Module, gm: fx.GraphModule, conv: fx.Node, kwargs: dict, replaced: fx.Node, erase,
             keep) -> None:
    """Call the fused layer ``conv`` on its input with ``kwargs`` in place of ``replaced`` (its uses move to the
    call), erase the nodes ``erase`` (users first), recompile, and keep the modules named in ``keep`` registered
    (the same state_dict keys, and ``reset_net`` still reaches a bypassed neuron)."""
    g = gm.graph
    with g.inserting_before(replaced):
        fused = g.call_module(conv.target, args=(conv.args[0],), kwargs=kwargs)
    replaced.replace_all_uses_with(fused)
    for n in erase:
        g.erase_node(n)
    g.lint()
    gm.recompile()
    for rel in keep:
        if rel is not None and not _has_submodule(gm, rel):
            gm.add_submodule(rel, block.get_submodule(rel))


def common_parent(*names: str) -> str:
    parts = [n.split(".")[:-1] for n in names]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)


def rel_name(name: str, parent: str) -> str:
    """``name`` relative to the module ``parent`` (both fully qualified names in the model)."""
    return name[len(parent) + 1:] if parent else name


def trace_block(block: nn.Module, through: frozenset | None = None) -> tuple[fx.GraphModule | None, str]:
    """(the block traced with torch.fx, '') or (None, the reason). Tracing runs the block's forward on proxies; every
    attribute it sets (``self.feat = y``) is put back, and such a block is not rewritten: a graph would not set
    it. A block already rewritten gives its graph, to be rewritten further. ``through``: trace only through these
    submodules (qualified names in the block), calling every other one as a module (a sibling whose forward does
    not trace, such as an attention module branching on its input's shape, then does not stop the trace)."""
    fwd = fused_forward(block)
    if fwd is not None:
        return fwd.gm, ""
    snapshot = [(m, dict(m.__dict__)) for m in block.modules()]
    tracer = _LeafTracer(through)
    try:
        graph = tracer.trace(block)
    except Exception:
        graph = None
    changed = []
    for m, before in snapshot:
        after = m.__dict__
        names = [k for k in after.keys() | before.keys() if after.get(k, _MISSING) is not before.get(k, _MISSING)]
        if names:
            changed += names if m is block else [f"{type(m).__name__}.{k}" for k in names]
            after.clear()
            after.update(before)
    if graph is None:
        return None, "block does not trace with torch.fx"
    if changed:
        return None, f"the block's forward sets {', '.join(sorted(changed))} (a rewritten forward would not)"
    own = [n.target for n in graph.nodes if n.op == "get_attr" and not _has_attr(block, n.target)]
    if own:
        return None, f"the traced graph holds constants of its own ({', '.join(own)})"
    gm = fx.GraphModule(block, graph, class_name=type(block).__name__ + "Fused")
    gm.meta[_INLINED] = tuple(tracer.inlined)
    return gm, ""


def through_paths(*rels: str) -> frozenset:
    """The submodules a trace must go through to reach the modules ``rels`` (names relative to the block)."""
    out = set()
    for rel in rels:
        parts = rel.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(out)


def returns_only(gm: fx.GraphModule, rel: str) -> bool:
    """Whether the call of the module ``rel`` in ``gm`` is what the graph returns, and used nowhere else (an add of
    it then sits in the forward of a block around this one)."""
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == rel), None)
    if node is None or len(node.users) != 1:
        return False
    out = next(iter(node.users))
    return out.op == "output" and out.args == (node,)


def residual_neuron(gm: fx.GraphModule | None, conv_rel: str, bn_rel: str) -> str | None:
    """Name of the module called on ``bn(conv(x)) + identity`` in the traced block, if it is a spiking neuron."""
    if gm is None:
        return None
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    bn = nodes.get(bn_rel)
    if bn is None or len(bn.users) != 1:
        return None
    add = next(iter(bn.users))
    if not _is_add(add) or len(add.users) != 1:
        return None
    nxt = next(iter(add.users))
    if nxt.op != "call_module":
        return None
    m = gm.get_submodule(nxt.target)
    return nxt.target if is_spiking_module(m) else None


def fuse_residual(block: nn.Module, gm: fx.GraphModule | None, conv_rel: str, bn_rel: str | None,
                  neuron_rel: str) -> tuple[fx.GraphModule | None, str]:
    """Rewrite ``gm`` (the traced ``block``) so that ``conv_rel`` takes the residual; returns (gm, '') on
    success, (None, reason) otherwise. ``conv_rel`` must already name the fused module."""
    if gm is None:
        return None, "block does not trace with torch.fx"
    g = gm.graph
    nodes = {n.target: n for n in g.nodes if n.op == "call_module"}
    conv = nodes.get(conv_rel)
    neuron = nodes.get(neuron_rel)
    if conv is None or neuron is None:
        return None, "conv or neuron not called directly in the block's forward"
    head = conv
    if bn_rel is not None:
        bn = nodes.get(bn_rel)
        if bn is None or list(conv.users) != [bn] or bn.args[:1] != (conv,):
            return None, "conv output does not go only to the batchnorm"
        head = bn
    add, other, why = _sole_add(head, "batchnorm output")
    if add is None:
        return None, why
    if list(add.users) != [neuron] or neuron.args[:1] != (add,) or len(neuron.args) != 1 or neuron.kwargs:
        return None, "the add does not feed only the neuron"
    _rewrite(block, gm, conv, {"residual": other}, neuron,
             (neuron, add, head, conv) if head is not conv else (neuron, add, conv), (bn_rel, neuron_rel))
    return gm, ""


def fuse_skip_add(block: nn.Module, gm: fx.GraphModule, conv_rel: str, neuron_rel: str) -> str:
    """Rewrite ``gm`` so that the fused spiking layer ``conv_rel`` (whose neuron is ``neuron_rel``) also does the
    add its spikes go into: ``add(neuron(bn(conv(x))), other)`` -> ``conv(x, residual=other, residual_after=True)``.
    Returns '' on success (``gm`` recompiled), else the reason (``gm`` unchanged)."""
    conv, neuron, why = _layer_and(gm, conv_rel, neuron_rel, "neuron")
    if conv is None:
        return why
    chain, cur = [conv], conv
    while cur is not neuron:  # conv -> (bn ->) neuron, each value used once, by the next module only
        users = list(cur.users)
        if len(chain) > 2 or len(users) != 1 or users[0].op != "call_module" or users[0].args != (cur,) \
                or users[0].kwargs:
            return "conv -> batchnorm -> neuron is not a chain of single uses in the block"
        cur = users[0]
        chain.append(cur)
    add, other, why = _sole_add(neuron, "the neuron's output")
    if add is None:
        return why
    _rewrite(block, gm, conv, {"residual": other, "residual_after": True}, add, [add, *reversed(chain)],
             [n.target for n in chain[1:]])
    return ""


def fuse_module_skip_add(block: nn.Module, gm: fx.GraphModule, rel: str) -> str:
    """Rewrite ``gm`` so that the module ``rel`` (one that takes ``residual``: ``forward(x, residual=r)`` is
    ``r + forward(x)``) also does the add its output goes into: ``add(m(x), other)`` -> ``m(x, residual=other)``.
    Returns '' on success (``gm`` recompiled), else the reason (``gm`` unchanged)."""
    node, _same, why = _layer_and(gm, rel, rel, "module")
    if node is None:
        return why
    add, other, why = _sole_add(node, "the module's output")
    if add is None:
        return why
    _rewrite(block, gm, node, {"residual": other}, add, (add, node), ())
    return ""


def fuse_sum(block: nn.Module, gm: fx.GraphModule | None, conv_rel: str, bn_rel: str) -> str:
    """Rewrite ``gm`` so that the layer ``conv_rel`` (a SparseConv2d writing a sum, its BatchNorm ``bn_rel`` folded)
    also does the add its BatchNorm output goes into: ``add(bn(conv(x)), other)`` -> ``conv(x, residual=other)``,
    whatever reads the sum. Returns '' on success (``gm`` recompiled), else the reason (``gm`` unchanged)."""
    if gm is None:
        return "block does not trace with torch.fx"
    conv, bn, why = _layer_and(gm, conv_rel, bn_rel, "batchnorm")
    if conv is None:
        return why
    if list(conv.users) != [bn] or bn.args != (conv,) or bn.kwargs:
        return "conv output does not go only to the batchnorm"
    add, other, why = _sole_add(bn, "batchnorm output")
    if add is None:
        return why
    _rewrite(block, gm, conv, {"residual": other}, add, (add, bn, conv), (bn_rel,))
    return ""


def _has_attr(m: nn.Module, target: str) -> bool:
    for part in target.split("."):
        if not hasattr(m, part):
            return False
        m = getattr(m, part)
    return True


def _has_submodule(m: nn.Module, rel: str) -> bool:
    try:
        m.get_submodule(rel)
        return True
    except AttributeError:
        return False
