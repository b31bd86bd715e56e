"""``export(model, example_inputs, path)``: an optimized model as an AOTInductor package that runs without Python.

The package (``.pt2``, :func:`torch._inductor.aoti_compile_and_package`) holds the compiled forward with every
SparseFlow kernel as GPU code, and the weights; it loads with ``torch._inductor.aoti_load_package`` in Python
(only torch installed: no sparseflow, SpikingJelly or triton import) or with
``torch::inductor::AOTIModelPackageLoader`` in C++ (``examples/deploy``).

What is exported:

* the **reset-state forward**: every call starts from reset neurons, as ``optimize(..., cuda_graph=True)`` does
  (one sample sequence ``[T, N, ...]`` per call). The network's neuron state is not an input or an output.
* the **paths frozen for the example's shapes**: the model runs once eagerly on ``example_inputs``, so that each
  layer measures and keeps its fastest path (sparse or dense fused kernel, cuDNN, ...); the export then traces
  those paths (each module's traced branch, the ``torch.ops.sparseflow`` operators). Shapes and dtype are
  those of the example: the package accepts exactly them (a clear error otherwise).
* **the weight preparation folded**: BatchNorm folding and weight packing depend on the weights only; they are
  computed once, with the same eager kernels as the optimized model, and stored as constants, so that the
  package neither recomputes them per call nor needs SparseFlow's Python operators to load.

:class:`ExportedModel` (returned) holds the ``torch.export.ExportedProgram``, the frozen shapes, the operators in
the graph and the check of the program's outputs against the optimized model's; ``<path>.json`` beside the
package records the same (``meta``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .cuda_graph import CudaGraphModel, reset_states

# operators that run SparseFlow Python code at run time: folded into constants, they must not remain in a package
_FOLD_ONLY = ("sparseflow::bn_affine", "sparseflow::fold_bn")
_IMPURE = ("rand", "bernoulli", "dropout", "normal", "uniform", "empty", "sparseflow::spiking_conv2d",
           "sparseflow::conv2d", "sparseflow::multistep_neuron", "sparseflow::max_pool2d", "sparseflow::linear",
           "sparseflow::ssa_attention", "sparseflow::channel_dot", "sparseflow::grouped_conv2d",
           "sparseflow::conv_transpose2d")


@dataclass
class ExportedModel:
    """What :func:`export` produced: ``path`` (the ``.pt2`` package, None when not compiled), ``program`` (the
    ``torch.export.ExportedProgram`` of the reset-state forward, weight preparation folded), the frozen input
    and output shapes, the operators in the graph, and ``max_abs_diff`` between the program's outputs and the
    optimized model's on the example."""

    path: str | None
    program: torch.export.ExportedProgram
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    ops: dict = field(default_factory=dict)
    max_abs_diff: float | None = None
    meta: dict = field(default_factory=dict)
    model: nn.Module | None = None  # the optimized model that was exported (its paths frozen for the example)

    def load(self):
        """The compiled package, loaded (``torch._inductor.aoti_load_package``): call it with the example's shapes."""
        if self.path is None:
            raise RuntimeError("no package was compiled (export(..., path=None)); use .program.module()")
        return torch._inductor.aoti_load_package(self.path)


class ResetForward(nn.Module):
    """``model``'s forward from reset neuron state, leaving the neurons reset: what the exported program computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        reset_states(self.model)
        out = self.model(*args)
        reset_states(self.model)
        return out


def _spec(t) -> dict:
    if isinstance(t, torch.Tensor):
        return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "device": str(t.device)}
    return {"value": repr(t)}


def _flat(out) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _op_name(target) -> str:
    name = getattr(target, "name", None)
    if callable(name):
        with contextlib.suppress(Exception):
            return str(name())
    return str(getattr(target, "__name__", target))


def graph_ops(gm: torch.fx.GraphModule) -> collections.Counter:
    """How often each operator is called in ``gm``'s graph (``namespace::name`` for registered operators)."""
    return collections.Counter(_op_name(n.target) for n in gm.graph.nodes if n.op == "call_function")


def fold_constants(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every node that depends on its attributes (weights) only computed now, with the eager
    operators, and stored as a constant: BatchNorm folds, weight packing, layout copies. Returns a new
    GraphModule holding only the attributes its graph still reads."""
    graph = gm.graph
    env: dict[torch.fx.Node, object] = {}

    def fetch(target):
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    weighty: set[torch.fx.Node] = set()  # computed from the attributes (not from factory calls alone)
    for node in list(graph.nodes):
        if node.op == "get_attr":
            env[node] = fetch(node.target)
            weighty.add(node)
        elif node.op == "call_function":
            deps = node.all_input_nodes
            name = _op_name(node.target)
            if any(d not in env for d in deps) or any(k in name for k in _IMPURE):
                continue
            if "assert" in name:  # a check of the example's metadata on weights: it holds, drop it
                if deps:
                    graph.erase_node(node)
                continue
            args = torch.fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
            with torch.no_grad():
                env[node] = node.target(*args, **kwargs)
            if any(d in weighty for d in deps):
                weighty.add(node)
    consts: dict[str, torch.Tensor] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node not in weighty:
            continue
        value = env[node]
        if not isinstance(value, torch.Tensor):
            continue
        if all(u in env and u.op == "call_function" for u in node.users):
            continue  # consumed by folded nodes only
        name = f"_sf_const{len(consts)}"
        consts[name] = value.detach()
        gm.register_buffer(name, consts[name])
        with graph.inserting_before(node):
            repl = graph.get_attr(name)
        node.replace_all_uses_with(repl)
    graph.eliminate_dead_code()
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            root[node.target] = fetch(node.target)
    new = torch.fx.GraphModule(root, graph)
    new.meta.update(getattr(gm, "meta", {}))
    return new


def _as_args(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _cast(args, dtype):
    if dtype is None:
        return args
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _max_diff(a, b) -> float:
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        return float("inf")
    diffs = [0.0]
    for x, y in zip(fa, fb):
        if x.numel():
            same_nan = torch.isnan(x) & torch.isnan(y)
            d = (x.double() - y.double()).abs().masked_fill(same_nan, 0)
            diffs.append(float(d.max()))
    return max(diffs)


def _batch_dims(args, max_batch: int):
    """``dynamic_shapes`` with the batch (dim 1 of a ``[T, N, ...]`` input, else dim 0) of every tensor symbolic."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    specs = []
    for a in args:
        if not isinstance(a, torch.Tensor) or a.dim() == 0:
            specs.append(None)
            continue
        d = 1 if a.dim() == 5 else 0
        if a.shape[d] < 2:
            raise ValueError(f"export(dynamic_batch=True): the example's batch (dim {d} of {tuple(a.shape)}) must be "
                             "at least 2 (torch.export specializes sizes 0 and 1)")
        specs.append({d: batch})
    return tuple(specs)


def trace(model: nn.Module, example_inputs, *, dtype: torch.dtype | None = None, optimize_kw: dict | None = None,
          dynamic_batch: bool = False, max_batch: int = 1024):
    """(optimized model, ExportedProgram of its reset-state forward with the weight preparation folded, example
    arguments, the optimized model's outputs on them). See :func:`export`."""
    from sparseflow_ops import frozen_specs

    from .optimize import is_optimized, optimize

    if isinstance(model, CudaGraphModel):
        model = model.model
    args = _cast(_as_args(example_inputs), dtype)
    if not any(isinstance(a, torch.Tensor) for a in args):
        raise ValueError("export: example_inputs must hold at least one tensor")
    if not is_optimized(model) or dtype is not None:
        model = optimize(model, args, dtype=dtype, inplace=False, **(optimize_kw or {}))
    model.eval()
    wrapper = ResetForward(model).eval()
    dyn = _batch_dims(args, max_batch) if dynamic_batch else None
    with torch.no_grad():
        wrapper(*args)  # each layer measures and keeps its path for these shapes
        ref = wrapper(*args)
        ref = torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, ref)
        with frozen_specs(model), warnings.catch_warnings():
            # the neurons' membrane attributes are assigned while tracing (and reset after): no state is exported
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            ep = torch.export.export(wrapper, args, dynamic_shapes=None if dyn is None else (dyn,), strict=False)
        reset_states(model)
        ep = ep.run_decompositions({})  # functional ATen: the weight packing's in-place copies become values
        folded = fold_constants(ep.module())
        ep = torch.export.export(folded, args, dynamic_shapes=dyn, strict=False)
    left = [name for name in graph_ops(ep.graph_module) if name.startswith(_FOLD_ONLY)]
    if left:
        raise RuntimeError(f"export: {left} still depend on the model's inputs after folding; the package would "
                           "need SparseFlow's Python operators to load")
    return model, ep, args, ref


def export(model: nn.Module, example_inputs, path: str | None, *, dtype: torch.dtype | None = None,
           dynamic_batch: bool = False, max_batch: int = 1024, check: bool = True, optimize_kw: dict | None = None,
           inductor_configs: dict | None = None) -> ExportedModel:
    """Optimize ``model`` (a copy; an optimized model is used as it is), freeze every layer's path for the shapes
    of ``example_inputs`` (a tensor or a tuple of arguments, e.g. ``[T, N, C, H, W]``), export its reset-state
    forward with ``torch.export`` and compile it into the AOTInductor package ``path`` (``.pt2``; None: no
    package, only the ``ExportedProgram``). ``dtype``: convert the model and the example first (e.g.
    ``torch.float16``). ``check``: run the exported program on the example and record its largest difference
    from the optimized model (``max_abs_diff``; it runs the same kernels, so 0 is expected).

    The package accepts the example's shapes and dtype only, batch size included; with ``dynamic_batch`` the batch
    (dim 1 of ``[T, N, ...]``, else dim 0; the example's must be >= 2) may be anything from 1 to ``max_batch``, each
    layer keeping the path it measured at the example's batch. AOTInductor compiles the
    Triton kernels for the GPU: packages need a CUDA example; on the CPU (Triton interpreter) ``path=None``
    gives the program. See docs/deploy.md."""
    if path is not None and not any(isinstance(a, torch.Tensor) and a.is_cuda for a in _as_args(example_inputs)):
        raise RuntimeError("export: an AOTInductor package of SparseFlow's Triton kernels needs a CUDA example "
                           "(the kernels are compiled to GPU code); on the CPU pass path=None for the program")
    model, ep, args, ref = trace(model, example_inputs, dtype=dtype, optimize_kw=optimize_kw,
                                 dynamic_batch=dynamic_batch, max_batch=max_batch)
    ops = dict(sorted(graph_ops(ep.graph_module).items()))
    diff = None
    if check:
        with torch.no_grad():
            diff = _max_diff(ep.module()(*args), ref)
    meta = {
        "format": "AOTInductor package (torch._inductor.aoti_compile_and_package)",
        "semantics": "reset-state forward: every call starts from reset neurons (as optimize(cuda_graph=True))",
        "frozen_shapes": (f"the batch dimension is dynamic (1 to {max_batch}); every other size and the dtypes are "
                          "those below" if dynamic_batch else
                          "the package accepts exactly the input shapes and dtypes below (batch size included)"),
        "dynamic_batch": bool(dynamic_batch),
        "inputs": [_spec(a) for a in args],
        "outputs": [_spec(t) for t in _flat(ref)],
        "sparseflow_ops": {k: v for k, v in ops.items() if k.startswith("sparseflow::")},
        "max_abs_diff_vs_optimized": diff,
        "torch": torch.__version__,
    }
    res = ExportedModel(None, ep, meta["inputs"], meta["outputs"], ops, diff, meta, model)
    if path is None:
        return res
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    res.path = torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs=inductor_configs)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=1)
    return res
