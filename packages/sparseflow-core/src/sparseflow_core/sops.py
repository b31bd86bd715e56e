"""Synaptic operations (SOPs) and theoretical energy, counted the way SNN papers count them.

* **SOPs** of a layer = the sum, over the input spikes it receives, of the fan-out each spike reaches: a spike
  at input position ``p`` of channel ``c`` of a convolution adds a weight to every output it feeds, i.e.
  ``C_out / groups`` output channels times the kernel taps that land on an output position (fewer at the
  borders: padding taps hit no spike, stride skips some). A ``Linear`` spike reaches ``out_features`` outputs.
  Counted exactly from the recorded inputs (float64), not estimated from a mean firing rate.
* **Graded inputs** (SEW-ResNet's ``spikes + identity``: non-negative integers such as 2) count
  ``value x fan-out``: an input of 2 is two spikes arriving together. The report marks such layers ``graded``.
* A layer whose input is not a count (an image, an average-pooled feature) is **not spike-driven**: it does
  ``macs`` multiply-accumulates, and no SOPs.
* **Theoretical energy** (the convention of the SNN literature, e.g. Spikformer, SEW-ResNet papers):
  ``E = E_MAC * MACs(non-spiking layers) + E_AC * SOPs(spike-driven layers)`` with ``E_MAC = 4.6 pJ`` and
  ``E_AC = 0.9 pJ`` (32-bit float multiply-add and add in 45 nm CMOS, Horowitz, ISSCC 2014).

:func:`spikingjelly_sops` counts the same model with SpikingJelly's independent ``SynOpCounter`` (aten-level:
binary operands only) for a cross-check; see docs/efficiency.md for where the two differ and why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

E_MAC_J = 4.6e-12  # 32-bit float multiply-accumulate, 45 nm (Horowitz 2014)
E_AC_J = 0.9e-12  # 32-bit float add, 45 nm (Horowitz 2014)

COUNTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _pair(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def input_kind(x: torch.Tensor) -> str:
    """``"binary"`` (every element 0 or 1), ``"graded"`` (non-negative integers, some above 1: spike counts) or
    ``"analog"`` (anything else: not spike-driven)."""
    if x.dtype == torch.bool:
        return "binary"
    if not x.is_floating_point():
        return "graded" if bool((x >= 0).all()) else "analog"
    if x.numel() == 0:
        return "binary"
    finite = bool(torch.isfinite(x).all())
    if not finite or bool((x < 0).any()) or not bool((x == torch.round(x)).all()):
        return "analog"
    return "binary" if bool((x <= 1).all()) else "graded"


def layer_sops(mod: nn.Module, x: torch.Tensor) -> int | None:
    """The SOPs of one call of ``mod`` (Conv1d/2d, ConvTranspose2d, Linear) on ``x`` (``[T, N, ...]`` multi-step
    inputs count like the flattened batch), each input element weighted by its value (see the module
    docstring); None for other modules or shapes."""
    x = x.detach()
    if isinstance(mod, nn.ConvTranspose2d) and x.dim() in (4, 5):
        flat = (x.flatten(0, 1) if x.dim() == 5 else x).double()
        s = flat.sum(1, keepdim=True)
        ones = torch.ones(1, 1, *_pair(mod.kernel_size, 2), dtype=torch.float64, device=x.device)
        reach = F.conv_transpose2d(s, ones, None, mod.stride, mod.padding, mod.output_padding, 1, mod.dilation)
        return round(float(reach.sum())) * (mod.out_channels // mod.groups)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and not isinstance(mod.padding, str):
        d = 2 if isinstance(mod, nn.Conv2d) else 1
        if x.dim() not in (d + 2, d + 3):
            return None
        flat = (x.flatten(0, 1) if x.dim() == d + 3 else x).double()
        s = flat.sum(1, keepdim=True)  # every channel of a sample reaches the same taps
        ones = torch.ones(1, 1, *_pair(mod.kernel_size, d), dtype=torch.float64, device=x.device)
        conv = F.conv2d if d == 2 else F.conv1d
        reach = conv(s, ones, None, mod.stride, mod.padding, mod.dilation)  # spikes x taps landing on outputs
        return round(float(reach.sum())) * (mod.out_channels // mod.groups)
    if isinstance(mod, nn.Linear) and x.dim() >= 1 and x.shape[-1] == mod.in_features:
        return round(float(x.double().sum())) * mod.out_features
    return None


def theoretical_energy(macs: int, sops: int, e_mac: float = E_MAC_J, e_ac: float = E_AC_J) -> float:
    """``e_mac * macs + e_ac * sops`` in joules (``macs`` of the non-spiking layers, ``sops`` of the spike-driven
    ones)."""
    if e_mac < 0 or e_ac < 0 or not math.isfinite(e_mac) or not math.isfinite(e_ac):
        raise ValueError(f"energy constants must be finite and >= 0, got e_mac={e_mac}, e_ac={e_ac}")
    return e_mac * macs + e_ac * sops


def attention_sops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """SOPs of spiking self-attention ``(q @ k^T) @ v`` on binary ``q``, ``k``, ``v`` (``[..., L, D]``): the first
    product adds a 1 for every pair of coincident spikes (``sum(q @ k^T)``, both operands spikes), the second one
    reaches ``D`` outputs for every spike of ``v`` times every query row (``nnz(v) * L``), as SpikingJelly's
    ``SynOpCounter`` counts ``bmm`` with a binary operand."""
    qk = q.double() @ k.double().transpose(-1, -2)
    L = q.shape[-2]
    return round(float(qk.sum())) + int((v != 0).sum()) * L


# ------------------------------------------------------------------------------------ SpikingJelly cross-check
def spikingjelly_sops(model: nn.Module, inputs, reset=None) -> dict[str, int]:
    """SynOps per module of one forward of ``model`` counted by SpikingJelly's ``SynOpCounter`` (aten-level, under
    ``DispatchCounterMode``): ``{module name: count}`` for the Conv/Linear modules (``"total"``: the whole
    model). Run it on the dense model: it counts aten convolutions and matrix products, which SparseFlow's
    kernels replace. ImportError when SpikingJelly lacks the op counter."""
    from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter

    from .cuda_graph import reset_states

    counter = SynOpCounter()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    (reset or reset_states)(model)
    with torch.no_grad(), DispatchCounterMode([counter]):
        model(*args)
    (reset or reset_states)(model)
    out: dict[str, int] = {"total": int(counter.get_total())}
    for scope, per_op in counter.get_counts().items():
        out[scope] = int(sum(per_op.values()))
    return out


def plot_layers(report, path: str) -> str:
    """PNG of the firing rate of every neuron layer and the SOPs of every spike-driven layer (MACs of the
    non-spiking ones beside them), in forward order. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    neurons = [e for e in report.layers if e.firing_rate is not None]
    counted = [e for e in report.layers if e.sops is not None or e.macs]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.28 * max(len(neurons), len(counted))), 7))
    a1.bar(range(len(neurons)), [e.firing_rate for e in neurons], color="tab:orange")
    a1.set_xticks(range(len(neurons)), [e.name for e in neurons], rotation=90, fontsize=6)
    a1.set_ylabel("firing rate")
    a1.set_title("firing rate per neuron layer")
    sop = [e.sops or 0 for e in counted]
    mac = [0 if e.spiking else (e.macs or 0) for e in counted]
    xs = range(len(counted))
    a2.bar(xs, sop, color="tab:blue", label="SOPs (spike-driven)")
    a2.bar(xs, mac, color="tab:gray", label="MACs (non-spiking)")
    a2.set_yscale("log")
    a2.set_xticks(xs, [e.name for e in counted], rotation=90, fontsize=6)
    a2.set_ylabel("operations per forward")
    a2.legend(fontsize=7)
    a2.set_title(f"SOPs {report.total_sops:.3g}, non-spiking MACs {report.nonspiking_macs:.3g}, "
                 f"theoretical energy {report.theoretical_energy_j * 1e3:.3g} mJ per forward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
