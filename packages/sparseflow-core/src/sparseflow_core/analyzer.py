"""Data-flow analysis: which layers consume spikes, and which conv -> BatchNorm -> neuron chains are pure.

One forward with example inputs runs on a deep copy of the model (the user's model and its neuron state
are not touched; a model that cannot be deep-copied, e.g. one holding a lock, runs itself and its state is put
back afterwards: every module's tensors, buffers and neuron memories, and the random number generators), with

* forward hooks on the *leaf* modules (registry.is_leaf) recording each call's input and output tensors,
* a ``TorchFunctionMode`` that follows every torch function called *between* leaf modules (reshapes,
  flatten, residual adds, concatenation, pooling...): views are aliases of their source (same values),
  other functions count as uses of their inputs, and spike provenance flows through the functions that
  keep spikes spikes (add, mul, cat, max-pool, ...).

A layer *consumes spikes* when its input descends from a spiking module's output through such functions
and holds integer values (0/1 spikes, or sums of them as in SEW-ResNet); image inputs and non-spiking
paths are left alone. A chain ``conv -> bn -> neuron`` is *pure* when each output is used exactly once, by
the next module, unchanged (no in-place write in between, checked through tensor version counters) and
only through views, and every call of each module belongs to the chain (a BatchNorm or neuron shared with
another path is not fused: :meth:`Analysis.chained`), so that one fused kernel can stand for the three.
Functions between leaf modules are recorded too (:class:`FnCall`), so that a residual add can be checked
(its operands have the output's shape, no broadcasting).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .registry import is_leaf, is_spiking_module, preserves_spikes
from .stats import block_density, element_density, is_integer_valued, silent_planes

# value-preserving views: the result holds the same elements as the source
_ALIAS = {
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze", "unsqueeze",
    "contiguous", "clone", "detach", "view_as", "reshape_as", "movedim", "float", "half", "bfloat16", "to",
    "type_as", "dropout", "identity", "__get__",
}
# functions after which integer spikes stay integer-valued spike counts
_SPIKE_KEEP = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "rsub", "__isub__",
    "mul", "__mul__", "__rmul__", "__imul__", "mul_", "logical_and", "logical_or", "logical_xor",
    "__and__", "__or__", "__xor__", "cat", "concat", "stack", "max_pool1d", "max_pool2d", "max_pool3d",
    "max_pool2d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "maximum", "minimum",
    "__getitem__", "narrow", "select", "chunk", "split", "pad", "repeat", "expand", "neg", "abs", "where",
    "index_select", "gather", "roll", "flip", "clamp", "clip", "relu", "__invert__",
}


def _fname(func) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:
        return None


@dataclass
class Use:
    kind: str  # "module", "fn" or "output"
    name: str
    direct: bool = False  # module use of the unchanged value, only through views


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


@dataclass
class FnCall:
    """One torch function called between leaf modules (not a view): its name, the roots and shapes of its tensor
    inputs, and the ids of its outputs."""

    name: str
    in_roots: list
    in_shapes: list
    out_ids: list


#: the functions that add two tensors (residual connections)
ADD_FUNCTIONS = {"add", "__add__", "__radd__", "__iadd__", "add_"}


@dataclass
class CallInfo:
    """One call of a leaf module in the example forward."""

    module: str
    in_shape: tuple
    out_shape: tuple | None
    in_dtype: torch.dtype | None
    producer: str | None  # leaf module whose output this call's first input is (through views only)
    direct: bool  # ... and unchanged since
    spike_source: bool  # first input descends from a spiking module
    integer: bool  # first input holds integer values
    out_root: int | None = None
    in_root: int | None = None  # root of the first input (following views)
    elem_density: float | None = None
    block_density: dict = field(default_factory=dict)
    silent_planes: float | None = None


@dataclass
class Analysis:
    calls: dict[str, list[CallInfo]]
    uses: dict[int, list[Use]]
    types: dict[str, type]
    output_roots: set[int]
    fns: list[FnCall] = field(default_factory=list)
    copied: bool = True  # False: the model could not be deep-copied and was analysed in place
    copy_error: str = ""

    def first(self, name: str) -> CallInfo | None:
        c = self.calls.get(name)
        return c[0] if c else None

    def spike_fed(self, name: str) -> tuple[bool, str]:
        """(True, '') when every call of ``name`` consumed spikes, else (False, reason)."""
        calls = self.calls.get(name)
        if not calls:
            return False, "not called in the example forward"
        for c in calls:
            if not c.spike_source:
                return False, "input does not come from a spiking module (image or non-spiking path)"
            if not c.integer:
                return False, "input derived from spikes but not integer-valued (not spikes)"
        return True, ""

    def writing_reader(self, name: str, reads_only) -> str:
        """'' when no reader of ``name``'s outputs may write into them: each is a module for which ``reads_only``
        holds (given its name) or a torch function that is no in-place one; else the first that may, named."""
        for c in self.calls.get(name) or []:
            if c.out_root is None:
                return "its output is not a tensor"
            for u in self.uses.get(c.out_root, []):
                if u.kind == "output":
                    return "its output is returned by the model"
                if u.kind == "fn" and (u.name.endswith("_") or u.name.startswith("__i") or u.name == "__setitem__"):
                    return f"{u.name}() writes into its output"
                if u.kind == "module" and not reads_only(u.name):
                    return f"its output is read by {u.name} ({self.types.get(u.name, type(None)).__name__}), " \
                           "which may write into it"
        return ""

    def chained(self, prev: str, nxt: str) -> tuple[bool, str]:
        """(True, '') when every call of ``nxt`` takes the whole, unchanged output of a call of ``prev`` and the two
        are called equally often (with ``sole_user(prev) == nxt`` every call of each belongs to the chain); else
        (False, reason): a module shared with another path must not be fused into this one."""
        p, n = self.calls.get(prev) or [], self.calls.get(nxt) or []
        if any(c.producer != prev or not c.direct for c in n) or len(n) != len(p):
            others = sorted({c.producer or "a function" for c in n if c.producer != prev})
            return False, (f"{nxt} is called {_times(len(n))}, {prev} {_times(len(p))}"
                           + (f" ({nxt} also takes the output of {', '.join(others)})" if others else "")
                           + ": a module shared with another path is not fused")
        return True, ""

    def fns_using(self, root: int | None) -> list[FnCall]:
        return [f for f in self.fns if root in f.in_roots]

    def add_broadcasts(self, roots) -> str:
        """'' when every add that takes one of ``roots`` adds two tensors of one shape; else the shapes of an add
        that broadcasts (or adds a number), which a fused layer cannot do in its epilogue."""
        for f in self.fns:
            if (f.name in ADD_FUNCTIONS and any(r in roots for r in f.in_roots)
                    and (len(f.in_shapes) != 2 or f.in_shapes[0] != f.in_shapes[1])):
                return " + ".join(str(s) for s in f.in_shapes) if len(f.in_shapes) == 2 else "a number"
        return ""

    def residual_fed(self, bn: str, neuron: str) -> tuple[bool, str]:
        """(True, '') when every call of ``neuron`` takes ``bn``'s output of one call plus another tensor of the
        same shape (``neuron(bn(..) + identity)``, in place or not), and the two are called equally often."""
        b, n = self.calls.get(bn) or [], self.calls.get(neuron) or []
        if len(b) != len(n):
            return False, (f"{neuron} is called {_times(len(n))}, {bn} {_times(len(b))}: a module shared with "
                           "another path is not fused")
        roots = {c.out_root for c in b}
        by_out = {i: f for f in self.fns for i in f.out_ids}
        for c in n:
            f = by_out.get(c.in_root) if c.in_root not in roots else next(
                (f for f in self.fns_using(c.in_root) if f.name in ADD_FUNCTIONS), None)
            if f is None or f.name not in ADD_FUNCTIONS or not roots & set(f.in_roots):
                return False, f"{neuron} is also called on other inputs: a module shared with another path is not fused"
        shapes = self.add_broadcasts(roots)
        if shapes:
            return False, f"the residual add broadcasts ({shapes})"
        return True, ""

    def sole_user(self, name: str) -> tuple[str | None, str]:
        """The one module that uses every output of ``name``, directly and whole; else (None, reason)."""
        calls = self.calls.get(name) or []
        users = set()
        for c in calls:
            if c.out_root is None:
                return None, "output is not a tensor"
            uses = self.uses.get(c.out_root, [])
            if c.out_root in self.output_roots:
                return None, "output is returned by the model"
            if len(uses) != 1:
                kinds = ", ".join(f"{u.kind}:{u.name}" for u in uses) or "nothing"
                return None, f"output used {len(uses)} times ({kinds})"
            u = uses[0]
            if u.kind != "module":
                return None, f"output goes through {u.name}() before the next layer"
            if not u.direct:
                return None, f"output is modified in place before {u.name}"
            users.add(u.name)
        if len(users) != 1:
            return None, f"calls feed different modules {sorted(users)}"
        return users.pop(), ""


class _Tracker(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.depth = 0  # > 0 while inside a leaf module
        self.keep: list[torch.Tensor] = []  # strong refs: ids stay unique during the pass
        self.alias: dict[int, tuple[int, object]] = {}  # id -> (root id, version when aliased)
        self.producer: dict[int, tuple[str, object]] = {}  # root id -> (module, version at output)
        self.spike: set[int] = set()
        self.uses: dict[int, list[Use]] = {}
        self.fns: list[FnCall] = []

    def root(self, t: torch.Tensor) -> tuple[int, bool]:
        """(root id, still-unchanged) following aliases."""
        i, ok = id(t), True
        while i in self.alias:
            i = self.alias[i][0]
        if i in self.producer:
            ok = _version(t) == self.producer[i][1] or (_version(t) is None)
        return i, ok

    def add_use(self, t: torch.Tensor, use: Use) -> None:
        r, _ = self.root(t)
        self.uses.setdefault(r, []).append(use)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth > 0:
            return out
        ins = [t for t in _tensors((args, kwargs))]
        if not ins:
            return out
        outs = [t for t in _tensors(out)]
        name = _fname(func)
        src_spike = all(id(t) in self.spike or self.root(t)[0] in self.spike for t in ins)
        if name in _ALIAS and len(ins) == 1:
            for o in outs:
                if o is ins[0]:
                    continue
                self.keep.append(o)
                self.alias[id(o)] = (id(ins[0]), _version(ins[0]))
                if src_spike:
                    self.spike.add(id(o))
            return out
        for t in ins:
            self.add_use(t, Use("fn", name))
        self.fns.append(FnCall(name, [self.root(t)[0] for t in ins], [tuple(t.shape) for t in ins],
                               [id(o) for o in outs if o is not ins[0]]))
        for o in outs:
            self.keep.append(o)
            if name in _SPIKE_KEEP and src_spike:
                self.spike.add(id(o))
            elif o is ins[0]:  # in-place op that mixes in non-spikes
                self.spike.discard(id(o))
        return out


def _stats(x: torch.Tensor, m: nn.Module) -> tuple[float, dict, float]:
    flat = x.flatten(0, 1) if x.dim() == 5 else x
    dens = element_density(flat)
    blocks = {}
    if isinstance(m, nn.Conv2d) and flat.dim() == 4:
        k, s = m.kernel_size[0], m.stride[0]
        p = m.padding[0] if isinstance(m.padding, tuple) else 0
        for tile in (8, 16):
            blocks[tile] = block_density(flat, tile=tile, group=16, kernel=k, stride=s, padding=min(p, k // 2))
    return dens, blocks, silent_planes(flat) if flat.dim() == 4 else None


def analyze(model: nn.Module, example_inputs, *, copy_model: bool = True, collect_stats: bool = True) -> Analysis:
    """Run one forward of (a deep copy of) ``model`` on ``example_inputs`` (a tensor or a tuple of
    positional arguments) and record the data flow between its leaf modules."""
    net, copy_error, snapshot = model, "", None
    if copy_model:
        try:
            net = copy.deepcopy(model)
        except Exception as e:  # (a lock, an open file, a generator...): analyse the model itself, state put back
            copy_error = f"{type(e).__name__}: {e}"
            snapshot = ModelState(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tr = _Tracker()
    calls: dict[str, list[CallInfo]] = {}
    types: dict[str, type] = {}
    handles = []
    pending: dict[str, list[CallInfo]] = {}

    def pre_hook(name, m):
        def hook(mod, inputs):
            ts = list(_tensors(inputs))
            info = None
            top = bool(ts) and tr.depth == 0
            tr.depth += 1  # (from here: the checks below are the analyzer's own, not uses of the input)
            if top:
                x = ts[0]
                r, ok = tr.root(x)
                prod = tr.producer.get(r)
                spike = id(x) in tr.spike or r in tr.spike
                info = CallInfo(
                    module=name, in_shape=tuple(x.shape), out_shape=None, in_dtype=x.dtype,
                    producer=prod[0] if prod else None, direct=bool(prod) and ok, spike_source=spike,
                    integer=is_integer_valued(x) if spike else False, in_root=r,
                )
                if collect_stats and spike and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    info.elem_density, info.block_density, info.silent_planes = _stats(x, mod)
                for t in ts:
                    r_t, ok_t = tr.root(t)
                    tr.uses.setdefault(r_t, []).append(Use("module", name, direct=ok_t and r_t in tr.producer))
            pending.setdefault(name, []).append(info)

        return hook

    def post_hook(name, m):
        def hook(mod, inputs, output):
            tr.depth -= 1
            info = pending[name].pop()
            outs = list(_tensors(output))
            if outs and tr.depth == 0:
                o = outs[0]
                tr.keep.append(o)
                tr.alias.pop(id(o), None)
                tr.producer[id(o)] = (name, _version(o))
                if is_spiking_module(mod) or (preserves_spikes(mod) and info is not None and info.spike_source):
                    tr.spike.add(id(o))
                else:
                    tr.spike.discard(id(o))
                if info is not None:
                    info.out_shape = tuple(o.shape)
                    info.out_root = id(o)
            if info is not None:
                calls.setdefault(name, []).append(info)

        return hook

    for name, m in net.named_modules():
        if name and is_leaf(m):
            types[name] = type(m)
            handles.append(m.register_forward_pre_hook(pre_hook(name, m)))
            handles.append(m.register_forward_hook(post_hook(name, m)))
    was_training = net.training
    try:
        with torch.no_grad(), tr:
            out = net(*args)
        output_roots = {tr.root(t)[0] for t in _tensors(out)}
        for r in output_roots:
            tr.uses.setdefault(r, []).append(Use("output", "<model output>"))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
        if snapshot is not None:
            snapshot.restore()
    return Analysis(calls=calls, uses=tr.uses, types=types, output_roots=output_roots, fns=tr.fns,
                    copied=not copy_error, copy_error=copy_error)


#: nn.Module's own bookkeeping attributes (parameters, buffers, children, hooks): not state a forward changes
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) - {"training"}


class _Saved:
    __slots__ = ("tensor", "value", "version")

    def __init__(self, t: torch.Tensor):
        self.tensor, self.version, self.value = t, _version(t), t.detach().clone()


def _saved(v):
    return _Saved(v) if isinstance(v, torch.Tensor) else v


def _put_back(saved):
    if isinstance(saved, _Saved):
        if _version(saved.tensor) != saved.version:
            with torch.no_grad():
                saved.tensor.copy_(saved.value)
        return saved.tensor
    return saved


class ModelState:
    """Everything a forward can change in a model, taken before and put back after one: each module's attributes
    (tensors by value; SpikingJelly's ``_memories``, one level deep), its buffers (BatchNorm statistics), and the
    random number generators. Attributes a forward adds are removed again."""

    def __init__(self, model: nn.Module):
        self.modules = []
        for m in model.modules():
            attrs = {}
            for k, v in vars(m).items():
                if k in _MODULE_INTERNALS:
                    continue
                attrs[k] = {kk: _saved(vv) for kk, vv in v.items()} if k == "_memories" and isinstance(v, dict) \
                    else _saved(v)
            buffers = {k: _saved(b) for k, b in m._buffers.items()}
            self.modules.append((m, attrs, buffers))
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        for m, attrs, buffers in self.modules:
            for k in [k for k in vars(m) if k not in _MODULE_INTERNALS and k not in attrs]:
                del m.__dict__[k]
            for k, v in attrs.items():
                if k == "_memories" and isinstance(v, dict):
                    m.__dict__[k] = {kk: _put_back(vv) for kk, vv in v.items()}
                else:
                    m.__dict__[k] = _put_back(v)
            for k in [k for k in m._buffers if k not in buffers]:
                del m._buffers[k]
            for k, v in buffers.items():
                m._buffers[k] = _put_back(v)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
