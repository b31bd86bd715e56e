"""The CPU demo of ``sparseflow-bench`` (``nox -s bench`` on a machine without a CUDA GPU).

SparseFlow's Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, which the CLI sets
before triton is imported): the same kernels a GPU runs, slowly, so the demo uses a small spiking CNN and shows
what ``optimize()`` does rather than how fast it is:

* which layers were fused, made sparse or left as they were, and why (``sparseflow.get_report``);
* the firing rate of every spiking neuron, and each layer's input element and block density and the kernel
  path it took (``sparseflow.profile``);
* exactness: the largest difference between the optimized and the dense model's outputs on a first call, a
  second call without a reset (neuron state carried over) and a call after ``reset_net``, computed on the
  kernels' outputs;
* the committed GPU results, with the device and date they were measured on.
"""

from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict

import torch
from torch import nn

DEMO_MODEL = "demo_cnn"


def demo_net(size: int = 16, num_classes: int = 10) -> nn.Module:
    """A small multi-step SpikingJelly CNN (``[T, N, 3, size, size]`` in, ``[T, N, num_classes]`` out; ``size``
    even) with one layer of each kind ``optimize()`` handles in a CNN:

    image conv -> BN -> LIF (fused; its input is an image) -> conv -> BN -> LIF (fused, spike-fed) -> conv -> BN ->
    max pool -> IF (sparse conv with the BatchNorm folded, max pool kernel, neuron kernel) -> flatten -> linear ->
    LIF (sparse linear) -> linear (readout). The linear layers' weights are multiples of 2**-8, so the readout's
    sums over spikes do not depend on their order and the outputs can be compared with the dense model's bit for
    bit."""
    from spikingjelly.activation_based import functional, layer, neuron

    if size < 2 or size % 2:
        raise ValueError(f"the demo model needs an even image size, got {size}")
    fc1, fc2 = layer.Linear(16 * (size // 2) ** 2, 32), layer.Linear(32, num_classes)
    with torch.no_grad():
        fc1.weight.normal_(std=4.0 / fc1.in_features ** 0.5)  # random weights on which lif3 fires
        for lin in (fc1, fc2):  # multiples of 2**-8: sums of spikes times them are exact in any order
            for p in (lin.weight, lin.bias):
                p.copy_(torch.round(p * 256) / 256)
    net = nn.Sequential(OrderedDict([
        ("stem_conv", layer.Conv2d(3, 8, 3, padding=1, bias=False)), ("stem_bn", layer.BatchNorm2d(8)),
        ("stem_lif", neuron.LIFNode(tau=2.0)),
        ("conv1", layer.Conv2d(8, 16, 3, padding=1, bias=False)), ("bn1", layer.BatchNorm2d(16)),
        ("lif1", neuron.LIFNode(tau=2.0)),
        ("conv2", layer.Conv2d(16, 16, 3, padding=1, bias=False)), ("bn2", layer.BatchNorm2d(16)),
        ("pool", layer.MaxPool2d(2)), ("if2", neuron.IFNode()),
        ("flatten", layer.Flatten()), ("fc1", fc1), ("lif3", neuron.LIFNode(tau=2.0)),
        ("fc2", fc2),
    ]))
    functional.set_step_mode(net, "m")
    return net.eval()


def interpreter_active() -> bool:
    """True when Triton runs its kernels through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prepared(T: int, batch: int, size: int, model_name: str = DEMO_MODEL):
    """The demo model (or a registered benchmark model) with BatchNorm statistics recalibrated on natural images,
    and its input ``[T, batch, 3, size, size]``."""
    from sparseflow_core import reset_states

    from .data import natural_images, repeat_time
    from .models import build_model, recalibrate_bn

    if model_name == DEMO_MODEL:
        torch.manual_seed(0)
        model = demo_net(size)
    else:
        model = build_model(model_name, T=T, num_classes=10)
    recalibrate_bn(model, natural_images(4, size, seed=0), T=T, batches=2)
    x = repeat_time(natural_images(batch, size, seed=1), T)
    reset_states(model)
    return model.eval(), x


def firing_rates(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str, float]]:
    """``(name, type, fraction of outputs that are spikes)`` of every spiking neuron of ``model`` on ``x`` (one
    forward from reset state)."""
    from sparseflow_core import reset_states
    from sparseflow_core.registry import is_spiking_module

    rates: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if name and is_spiking_module(m):
            def hook(mod, inp, out, name=name):
                o = out[0] if isinstance(out, tuple) else out
                r = rates.setdefault(name, [type(mod).__name__, 0, 0])
                r[1] += int((o != 0).sum())
                r[2] += o.numel()

            hooks.append(m.register_forward_hook(hook))
    try:
        reset_states(model)
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        reset_states(model)
    return [(n, t, nz / max(1, tot)) for n, (t, nz, tot) in rates.items()]


def exactness(dense: nn.Module, opt: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """max |optimized - dense| on a first call, a second call without a reset, and a call after reset."""
    from sparseflow_core import reset_states

    out = {}
    with torch.no_grad():
        reset_states(dense)
        reset_states(opt)
        for what in ("first call", "second call, no reset", "after reset_net"):
            if what == "after reset_net":
                reset_states(dense)
                reset_states(opt)
            ref = dense(x)
            y = torch.full_like(ref, float("nan"))  # a result that is never written stays NaN, never 0
            y.copy_(opt(x))
            out[what] = float((y - ref).abs().max())
    return out


def layer_table(prof) -> str:
    """The profile's layers without timings (interpreted kernels have none worth reading): input shape, element
    density, block size and density, the share of the work the path skipped, the path."""
    head = ("layer", "type", "input", "elem", "bs", "blocks", "skipped", "path")
    fmt = lambda v, f=".3f": "" if v is None else format(v, f)
    rows = [(e.name, e.type, "x".join(map(str, e.in_shape or [])), fmt(e.elem_density), fmt(e.block_size, "d"),
             fmt(e.block_density), fmt(e.skipped), e.path or "") for e in prof.layers]
    return _table(head, rows)


def _table(head, rows) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    line = lambda r: "  ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def committed_results(root: str) -> str | None:
    """The README's results block of the newest committed GPU results under ``root``, or None."""
    from .layout import current_results_dir
    from .report import readme_results

    d = current_results_dir(root)
    if d is None:
        return None
    return readme_results(d, plot=False)


def run_demo(T: int = 2, batch: int = 1, size: int = 16, block_size=None, mode: str = "sparse",
             model_name: str = DEMO_MODEL, out: str | None = None, results_root: str | None = None,
             log=print) -> int:
    """Run the CPU demo; 0 when the optimized model's outputs equal the dense model's on all three calls.

    ``mode``: ``optimize()``'s mode; the default ``"sparse"`` takes the block-skipping paths wherever they apply
    (on a GPU, ``"auto"`` times the paths and keeps the fastest; the interpreter gives no timings to choose by).
    ``out``: a folder for the profile's JSON and CSV. ``results_root``: where the committed GPU results lie."""
    from sparseflow_core import optimize, profile, reset_states

    t0 = time.time()
    step = lambda what: log(f"[{time.time() - t0:5.1f} s] {what}")
    kernels = interpreter_active()
    log(f"SparseFlow CPU demo: {model_name}, T={T}, batch {batch}, {size}x{size} natural images (skimage.data), "
        "random weights with BatchNorm statistics recalibrated on them.")
    if kernels:
        log("No CUDA GPU here: SparseFlow's Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1), "
            "the same kernels a GPU runs, slowly. Nothing below is a timing.\n")
    else:
        log("TRITON_INTERPRET is not set: CPU tensors run the dense torch ops, not SparseFlow's kernels.\n")
    step("building the model")
    model, x = prepared(T, batch, size, model_name)
    dense = copy.deepcopy(model)
    rates = firing_rates(dense, x)
    step(f"sparseflow.optimize(model, x, mode={mode!r})")
    opt, report = optimize(model, x, block_size=block_size, mode=mode, return_report=True)
    step("comparing with the dense model")
    err = exactness(dense, opt, x)
    step("sparseflow.profile(model, x)")
    reset_states(opt)
    save = [os.path.join(out, f"profile_{model_name}_cpu.{ext}") for ext in ("json", "csv")] if out else None
    prof = profile(opt, x, reps=1, block_size=block_size if isinstance(block_size, int) else None, dense=False,
                   save=save)
    step("done\n")

    log("What optimize() did (sparseflow.get_report(model)): fused = conv + BatchNorm + neuron in one kernel; "
        "sparse = block-skipping kernel; left = unchanged, the reason says why.\n")
    log(report.table())
    log("\nFiring rates (fraction of each neuron layer's outputs that are spikes, dense model):\n")
    log(_table(("neuron", "type", "rate"), [(n, t, f"{r:.3f}") for n, t, r in rates]))
    log("\nPer layer (sparseflow.profile): input shape, element density, block size, block density (blocks holding "
        "a non-zero), share of the work the path skipped, kernel path taken:\n")
    log(layer_table(prof))
    if prof.skippable_work is not None:
        log(f"\nwork in all-zero blocks {prof.skippable_work:.1%} (MAC-weighted), skipped by the paths taken "
            f"{prof.skipped_work:.1%}")
        if prof.skippable_work < 0.01:
            log(f"(on {size}x{size} maps nearly every block, with its receptive-field halo, holds a spike, so there is "
                "little to skip; larger maps and sparser layers leave more: see the block densities of the GPU "
                "profiles below)")
    src = "SparseFlow's kernels (interpreted)" if kernels else "the dense torch ops (no interpreter)"
    log(f"\nExactness, max |optimized - dense| over the outputs, computed on {src}:")
    for what, v in err.items():
        log(f"  {what:<24} {v:.3g}")
    if results_root:
        block = committed_results(results_root)
        if block:
            log(f"\nCommitted GPU results ({results_root}; the GPU run of `nox -s bench` writes them):\n")
            log(block)
    log(f"demo took {time.time() - t0:.1f} s")
    return 0 if all(v == 0.0 for v in err.values()) else 1
