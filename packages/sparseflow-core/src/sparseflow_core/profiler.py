"""``profile(model, inputs)``: per-layer latency and sparsity of any model, optimized or not.

For every convolution, linear layer and spiking neuron (leaf modules) it records:

* ``ms``: the latency of the layer's calls in one forward (mean over ``reps`` forwards; CUDA events on a GPU,
  wall clock on the CPU), and for SparseFlow modules (``SparseModule``) ``dense_ms``, the same calls run by
  the layer's dense op (``to_dense()`` of a copy, plus the BatchNorm and neuron it fused) on the same
  inputs, hence ``speedup = dense_ms / ms``;
* ``elem_density``: the fraction of non-zero elements of its input (over all its calls in one forward);
* ``block_density``: the fraction of blocks that hold any non-zero, at ``block_size`` (the layer's own when
  it has one, else the rule of :func:`select_block_size`, else 8). A block is, for a convolution,
  (sample, ``block_size`` x ``block_size`` output tile, ``group`` input channels) counting every input pixel in
  the tile's receptive field (the halo), with partial tiles at the edge of odd-sized maps counted as
  blocks; for ``Conv1d`` the same with ``block_size`` output positions; for ``Linear``, (``block_size`` rows
  x ``group`` input features) of the input flattened to ``[rows, features]``;
* ``skippable = 1 - block_density`` (the work a block-skipping kernel could drop) and ``skipped`` (what this
  layer's path does drop: ``skippable`` on a sparse path, 0 on a dense path or a dense module);
* ``macs``: multiply-accumulates per forward (convolutions and linear layers), which weighs the model-wide
  ``skippable_work`` and ``skipped_work`` fractions.

A :class:`CudaGraphModel` (``optimize(..., cuda_graph=True)``) is profiled layer by layer on the model it wraps
(graph replays run no module hooks); its whole forward is timed replayed.

The whole forward is timed again without hooks (``forward_ms``, ``throughput_per_s`` forwards per second and
``samples_per_s``), and on a GPU NVML's energy counter is read around those forwards. On the CPU the timings
are those of the CPU ops (SparseFlow modules run the dense torch ops there), the densities and the layer list
are the same as on a GPU.

Synaptic operations and energy (:mod:`sparseflow_core.sops`): ``sops`` of every Conv/Linear layer whose input is
spikes or spike counts (``input``: ``binary`` / ``graded`` / ``analog``), ``firing_rate`` of every neuron layer,
``energy_j`` (``e_ac * sops`` for spike-driven layers, ``e_mac * macs`` for the others) and the totals
(``theoretical_energy_j``), beside NVML's measured joules (``energy_source`` says whether NVML was read).

The result is a :class:`~.profile_report.ProfileReport` (:mod:`.profile_report`: the table, JSON, CSV, ``save``);
``profile(..., save=path)`` saves it directly.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from sparseflow_ops import OBSERVER_ATTR

from .blocks import select_block_size
from .cuda_graph import CudaGraphModel, reset_states
from .profile_report import CSV_COLUMNS, KIND_ORDER, LayerProfile, ProfileReport
from .registry import is_spiking_module
from .sops import COUNTED, E_AC_J, E_MAC_J, input_kind, layer_sops, theoretical_energy

__all__ = ["CSV_COLUMNS", "LayerProfile", "ProfileReport", "block_counts", "dense_op", "profile"]

# ------------------------------------------------------------------------------------------- statistics
_TIMED = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose2d)


def _timed_modules(model):
    for name, m in model.named_modules():
        if name and (isinstance(m, _TIMED) or is_spiking_module(m)):
            yield name, m


def _pair(v, n=2):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _tiles_any(nz: torch.Tensor, bs: int, dims: int) -> torch.Tensor:
    """Any over ``bs``-sized tiles of the last ``dims`` dimensions, partial tiles at the end included."""
    pads = []
    for d in range(dims):
        n = nz.shape[-1 - d]
        pads += [0, -(-n // bs) * bs - n]
    nz = F.pad(nz, pads)
    if dims == 1:
        return nz.unflatten(-1, (-1, bs)).amax(-1)
    H, W = nz.shape[-2:]
    return nz.unflatten(-1, (W // bs, bs)).unflatten(-3, (H // bs, bs)).amax((-1, -3))


def _channel_groups(nz: torch.Tensor, group: int) -> torch.Tensor:
    """``[B, C, ...]`` -> ``[B, ceil(C / group), ...]``: any over each group of ``group`` channels."""
    C = nz.shape[1]
    G = -(-C // group)
    if G * group != C:
        pad = [0, 0] * (nz.dim() - 2) + [0, G * group - C]
        nz = F.pad(nz, pad)
    return nz.unflatten(1, (G, group)).amax(2)


def block_counts(mod: nn.Module, x: torch.Tensor, block_size: int, group: int = 16) -> tuple[int, int] | None:
    """(blocks holding any non-zero, all blocks) of ``mod``'s input ``x`` (see the module docstring), or None
    where blocks are not defined (neurons, transposed convolutions, unexpected shapes)."""
    if x.numel() == 0:
        return None
    if isinstance(mod, nn.Conv2d) and x.dim() in (4, 5) and not isinstance(mod.padding, str):
        flat = x.flatten(0, 1) if x.dim() == 5 else x
        nz = _channel_groups((flat != 0).float(), group)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding),
                                                  _pair(mod.dilation))
        nz = F.pad(nz, (pw, pw, ph, ph))  # zero padding holds no non-zero
        rf = F.max_pool2d(nz, (kh, kw), (sh, sw), 0, (dh, dw))  # any non-zero in each output's receptive field
        tiles = _tiles_any(rf, block_size, 2)
    elif isinstance(mod, nn.Conv1d) and x.dim() in (3, 4) and not isinstance(mod.padding, str):
        flat = x.flatten(0, 1) if x.dim() == 4 else x
        nz = _channel_groups((flat != 0).float(), group)
        (k,), (s,), (p,), (d,) = (_pair(mod.kernel_size, 1), _pair(mod.stride, 1), _pair(mod.padding, 1),
                                  _pair(mod.dilation, 1))
        nz = F.pad(nz, (p, p))
        rf = F.max_pool1d(nz, k, s, 0, d)
        tiles = _tiles_any(rf, block_size, 1)
    elif isinstance(mod, nn.Linear) and x.dim() >= 1:
        rows = x.reshape(-1, x.shape[-1])
        nz = (rows != 0).float().t().unsqueeze(0)  # [1, K, M]: features as channels, rows as positions
        tiles = _tiles_any(_channel_groups(nz, group), block_size, 1)
    else:
        return None
    return int((tiles > 0).sum()), tiles.numel()


def _macs(mod: nn.Module, out) -> int | None:
    if not isinstance(out, torch.Tensor):
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        k = 1
        for v in _pair(mod.kernel_size, 2 if isinstance(mod, nn.Conv2d) else 1):
            k *= v
        return out.numel() * (mod.in_channels // mod.groups) * k
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    return None


def _layer_block_size(mod: nn.Module, x: torch.Tensor, block_size: int | None) -> int:
    if block_size is not None:
        return int(block_size)
    own = getattr(mod, "block_size", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    if isinstance(mod, nn.Conv2d) and x.dim() in (4, 5):
        rule = select_block_size(int(x.shape[-2]))
        if isinstance(rule, int):
            return rule
    return 8


# ------------------------------------------------------------------------------------------- dense ops
def _is_sparse_module(m: nn.Module) -> bool:
    try:
        from sparseflow_ops import SparseModule
    except ImportError:  # pragma: no cover - sparseflow_ops is a dependency of core
        return False
    return isinstance(m, SparseModule)


def _is_bypassed(m: nn.Module) -> bool:
    fwd = m.__dict__.get("forward")
    return fwd is not None and type(fwd).__name__ == "Bypass"


def dense_op(mod: nn.Module, with_fused: bool = True, with_pool: bool | None = None):
    """A callable with ``mod``'s call signature running its dense equivalent: ``to_dense()`` of a copy, then (with
    ``with_fused``) the BatchNorm (``folded_bn``), the residual (before the neuron, or with ``residual_after`` after
    it), the neuron (``fused_neuron``, reset first) and (``with_pool``, by default as ``with_fused``) the max pool
    after it (``fused_pool``) it fused."""
    work = copy.deepcopy(mod)
    bn, neuron = getattr(work, "folded_bn", None), getattr(work, "fused_neuron", None)
    pool = getattr(work, "fused_pool", None)
    if not with_fused:
        bn = neuron = None
    if not (with_fused if with_pool is None else with_pool):
        pool = None
    base = work.to_dense()

    def run(x, *args, residual=None, residual_after=False, **kwargs):
        if x.dim() == 5 and isinstance(base, nn.Conv2d) and getattr(base, "step_mode", "s") != "m":
            y = base(x.flatten(0, 1), *args, **kwargs)
            y = y.view(*x.shape[:2], *y.shape[1:])
        else:
            y = base(x, *args, **kwargs)
        if bn is not None:
            y = bn(y)
        if residual is not None and not residual_after:
            y = y + residual
        if neuron is not None:
            reset_states(nn.ModuleList([neuron]))
            y = neuron(y)
        if pool is not None:
            y = pool(y)
        return residual + y if residual is not None and residual_after else y

    return run


def _time_calls(fn, calls, reps: int, cuda: bool) -> float:
    """ms of running ``fn`` on every recorded ``(args, kwargs)`` once (mean over ``reps``, after a warm-up)."""
    with torch.no_grad():
        for a, k in calls:
            fn(*a, **k)
        total = 0.0
        for _ in range(reps):
            for a, k in calls:
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    fn(*a, **k)
                    e.record()
                    e.synchronize()
                    total += s.elapsed_time(e)
                else:
                    t = time.perf_counter()
                    fn(*a, **k)
                    total += (time.perf_counter() - t) * 1e3
    return total / max(1, reps)


def _detach(v):
    return v.detach().clone() if isinstance(v, torch.Tensor) else v


# ------------------------------------------------------------------------------------------- profile
def profile(model: nn.Module, inputs, *, reps: int = 5, block_size: int | None = None, group: int = 16,
            reset: bool = True, dense: bool | None = None, batch: int | None = None, save=None,
            print_table: bool = False, tile: int | None = None, e_mac: float = E_MAC_J, e_ac: float = E_AC_J,
            plot: str | None = None) -> ProfileReport:
    """Profile ``reps`` forwards of ``model`` on ``inputs`` (a tensor or a tuple of arguments); the whole forward's
    time and energy are taken over at least ``reps`` forwards (on a GPU, at least one second of them).

    ``block_size``: block edge of the block densities (default: each layer's own, else the rule of
    ``select_block_size``, else 8; ``tile`` is an older name of it); ``group``: input channels per block.
    ``dense``: also time the dense op of every SparseFlow layer on its recorded inputs (default: on a GPU).
    ``batch``: samples per forward for ``samples_per_s`` (default: dim 1 of a 5-D ``[T, N, ...]`` input, else
    dim 0). ``reset``: reset neuron states before every forward. ``save``: a path or a list of paths
    (.json / .csv / other = table). ``print_table``: print the table. ``e_mac`` / ``e_ac``: joules per MAC / per
    synaptic operation of the theoretical energy (default 4.6 pJ / 0.9 pJ, 45 nm). ``plot``: a PNG path for the
    firing rates and SOPs per layer (matplotlib).
    """
    theoretical_energy(0, 0, e_mac, e_ac)  # checks the constants
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if block_size is None:
        block_size = tile
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1):
        raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    cuda = first is not None and first.is_cuda
    if dense is None:
        dense = cuda
    if batch is None and first is not None and first.dim() >= 1:
        batch = int(first.shape[1] if first.dim() == 5 else first.shape[0])
    rows: dict[str, LayerProfile] = {}
    counts: dict[str, list[int]] = {}  # name -> [non-zeros, elements, active blocks, blocks]
    recorded: dict[str, list] = {}  # name -> [(args, kwargs)] of one forward (SparseFlow modules, for dense_ms)
    tails: dict[str, tuple] = {}  # name -> (the SparseFlow layer ran its BatchNorm/neuron itself, and its max pool)
    starts: dict[str, list] = {}
    fires: dict[str, list[int]] = {}  # neuron name -> [spikes, outputs]
    handles = []
    phase = ["off"]  # "stats" (the warm-up forward), "time" (the timed forwards) or "off"

    def pre(name):
        def hook(mod, inp, kwargs):
            if phase[0] == "off":
                return
            row = rows.setdefault(name, LayerProfile(name, type(mod).__name__))
            if phase[0] == "stats":
                x = next((t for t in inp if isinstance(t, torch.Tensor)), None)
                if x is not None:
                    c = counts.setdefault(name, [0, 0, 0, 0])
                    c[0] += int((x != 0).sum())
                    c[1] += x.numel()
                    if row.in_shape is None:
                        row.in_shape = list(x.shape)
                    if isinstance(mod, COUNTED) and not _is_bypassed(mod):
                        kind = input_kind(x)
                        if KIND_ORDER[kind] >= KIND_ORDER.get(row.input_kind, -1):
                            row.input_kind = kind
                        n = layer_sops(mod, x) if kind != "analog" else None
                        if n is not None:
                            row.sops = (row.sops or 0) + n
                    if not _is_bypassed(mod):
                        bs = _layer_block_size(mod, x, block_size)
                        bc = block_counts(mod, x, bs, group)
                        if bc is not None:
                            row.block_size = bs
                            c[2] += bc[0]
                            c[3] += bc[1]
                if row.sparse_module:
                    recorded.setdefault(name, []).append((tuple(_detach(a) for a in inp),
                                                          {k: _detach(v) for k, v in kwargs.items()}))
                return
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                starts.setdefault(name, []).append(ev)
            else:
                starts.setdefault(name, []).append(time.perf_counter())

        setattr(hook, OBSERVER_ATTR, True)  # it times the optimized model as it runs: no fused chain turns dense
        return hook

    def post(name):
        def hook(mod, inp, kwargs, out):
            if phase[0] == "off":
                return
            row = rows[name]
            if phase[0] == "stats":
                macs = _macs(mod, out)
                if macs is not None:
                    row.macs = (row.macs or 0) + macs
                if is_spiking_module(mod) and isinstance(out, torch.Tensor):
                    f = fires.setdefault(name, [0, 0])
                    f[0] += int((out != 0).sum())
                    f[1] += out.numel()
                if row.sparse_module:
                    # did it take over the BatchNorm/neuron after it (they are then skipped), or run the
                    # conv alone (CPU, training: they run themselves)?
                    tails[name] = (kwargs.get("residual") is not None or bool(mod.__dict__.get("_pending", False)),
                                   bool(mod.__dict__.get("_pool_pending", False)))
                return
            st = starts[name].pop()
            if cuda:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                ev.synchronize()
                row.ms += st.elapsed_time(ev)
            else:
                row.ms += (time.perf_counter() - st) * 1e3
            row.calls += 1
            if _is_bypassed(mod):  # a module a SparseFlow layer took over returns its input untouched
                row.path = "fused" if inp and out is inp[0] else None
            else:
                row.path = getattr(mod, "last_path", None)

        setattr(hook, OBSERVER_ATTR, True)
        return hook

    # a CUDA-graph wrapper replays without running module hooks: the layers are profiled on the wrapped model
    # (eager), the whole forward on the wrapper (replayed)
    whole = model
    if isinstance(model, CudaGraphModel):
        model = model.model
    for name, m in _timed_modules(model):
        rows[name] = LayerProfile(name, type(m).__name__, sparse_module=_is_sparse_module(m))
        handles.append(m.register_forward_pre_hook(pre(name), with_kwargs=True))
        handles.append(m.register_forward_hook(post(name), with_kwargs=True))
    rep = ProfileReport(device=torch.cuda.get_device_name(first.device) if cuda else "cpu", batch=batch, reps=reps,
                        e_mac_j=float(e_mac), e_ac_j=float(e_ac),
                        energy_source="not available: NVML energy is read on CUDA devices only")

    def forward():
        if reset:
            reset_states(model)
        return model(*args)

    try:
        with torch.no_grad():
            forward()  # warm-up: compiles kernels, lets layers pick their paths
            phase[0] = "stats"
            forward()  # densities, MACs and the inputs of the SparseFlow layers
            phase[0] = "time"
            for _ in range(reps):
                forward()
            phase[0] = "off"
            for h in handles:
                h.remove()
            handles.clear()
            # whole-forward time and energy without the hooks and their synchronisation
            if cuda:
                torch.cuda.synchronize()
            if whole is not model:
                for _ in range(whole.warmup + 1):  # until the wrapper has captured its graph
                    whole(*args)
                if cuda:
                    torch.cuda.synchronize()
            energy, why = _nvml_energy() if cuda else (None, rep.energy_source)
            rep.energy_source = "NVML nvmlDeviceGetTotalEnergyConsumption" if energy else why
            e0 = energy() if energy else None
            run = forward if whole is model else (lambda: whole(*args))  # (a graph wrapper resets the neurons)
            t0, n = time.perf_counter(), 0
            # on a GPU at least a second of forwards: NVML's energy counter moves in steps far coarser than one
            while n < reps or (cuda and time.perf_counter() - t0 < 1.0):
                run()
                n += 1
            if cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / n
            if energy:
                rep.energy_j_per_forward = (energy() - e0) / 1e3 / n
    finally:
        phase[0] = "off"
        for h in handles:
            h.remove()
    layers = []
    for name, row in rows.items():
        if row.calls == 0 and name not in counts:
            continue  # never called in a forward
        row.ms /= reps
        row.calls //= reps
        c = counts.get(name)
        if row.path == "fused":
            c = None  # its "input" was the fused layer's output: no work of its own
        if c and c[1]:
            row.elem_density = c[0] / c[1]
        if c and c[3]:
            row.block_density = c[2] / c[3]
        f = fires.get(name)
        if f and f[1]:  # (a neuron fused upstream hands the fused layer's spikes through: the same rate)
            row.firing_rate = f[0] / f[1]
        if row.sops is not None:
            row.energy_j = e_ac * row.sops
        elif row.macs:
            row.energy_j = e_mac * row.macs
        layers.append(row)
    if dense:
        mods = dict(model.named_modules())
        for row in layers:
            calls = recorded.get(row.name)
            if not calls:
                continue
            try:
                row.dense_ms = _time_calls(dense_op(mods[row.name], *tails.get(row.name, (True, None))), calls,
                                           reps, cuda)
            except Exception as e:  # report the layer without a dense figure rather than fail the profile
                row.dense_ms = None
                row.path = f"{row.path or ''} (dense op failed: {type(e).__name__})".strip()
    rep.layers = layers
    rep.forward_ms = dt * 1e3
    rep.throughput_per_s = 1.0 / dt if dt > 0 else 0.0
    rep.samples_per_s = rep.throughput_per_s * batch if batch else None
    for path in [save] if isinstance(save, str) else (save or []):
        rep.save(path)
    if print_table:
        print(rep.table())
    if plot:
        from .sops import plot_layers

        plot_layers(rep, plot)
    return rep


def _nvml_energy():
    """(a reader of the GPU's energy counter in mJ, None) or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "not available: pynvml is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
        idx = torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(idx)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h)), None
    except Exception as e:
        return None, f"not available: NVML energy counter unreadable ({type(e).__name__}: {e})"[:200]
