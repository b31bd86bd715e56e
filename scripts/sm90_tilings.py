"""Compile the fused spiking convolution's tilings for sm_90a on a machine without a GPU, and print
what each costs in resources: registers and spills (ptxas), shared memory, tensor-core instructions (HGMMA: wgmma;
HMMA: mma.sync), barriers, shared-memory stores and loads (LDSM: ldmatrix), shuffles and the static instruction
count (SASS).

    python scripts/sm90_tilings.py                       # every TMA tiling on spiking_resnet34's 3x3 layer shapes
    python scripts/sm90_tilings.py tma_tm_4x8:256:256:14:r --T 4 --N 8

A spec is ``name:C:CO:H``, ``name`` any configuration of ``sparseflow_kernels.tiling.spiking_configs`` (pointer
loads too, such as ``fused_tm``), ``:r`` a residual before the neuron, ``:s`` that residual and the sum written
(``return_sum``: a layer writing MS-ResNet's residual stream and its reading neuron's spikes), ``:p`` the spikes max
pooled 2 / 2 in the epilogue (a steps-looped tiling), ``:t`` a static input (one frame per sample repeated over T by
stride 0, which a steps-looped tiling convolves once); ``--k`` and ``--stride`` set the convolution's kernel and stride
(default 3 and 1, padding ``k // 2``: ``--k 7 --stride 2`` is a ResNet's stem); or ``neuron:C:C:H[:r]``, the multi-step neuron
kernel over a ``[T, N, C, H, H]`` channels_last map (BatchNorm folded), ``:r`` with a residual in the other memory
order (NCHW) and the sum written, as MS-ResNet's sum kernels run; or ``pool:C:C:H[:3]``, the neuron with the max pool
of its spikes (``multistep_neuron_pool``, a row for each kernel it launches) over that map, windows of 2 / stride
2 (``:3``: 3 / 2 / 1, a ResNet stem's). ``--pdl`` compiles the kernels as they launch with programmatic dependent launch (``PDL=True``: each
program first waits for the previous kernel, ``griddepcontrol`` in the PTX, counted in the ``GDC`` column). Needs
torch and triton, whose wheel carries
ptxas and cuobjdump; no GPU and no interpreter (``TRITON_INTERPRET`` is ignored). The kernels are compiled, never run:
the launcher is stopped after Triton's ``warmup``. Figures are static (instructions in the binary, not executed), for
comparing tilings and kernel changes before they are timed on the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "packages/sparseflow-kernels/src"), str(ROOT / "packages/sparseflow-bench/src")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import sparseflow_kernels.conv as kconv  # noqa: E402
import sparseflow_kernels.neuron as kneuron  # noqa: E402
import sparseflow_kernels.neuron_pool as kneuron_pool  # noqa: E402
import sparseflow_kernels.spiking as kspiking  # noqa: E402
from sparseflow_bench.sections.shapes import SHAPES  # noqa: E402  (spiking_resnet34's 3x3 layers: channels, map)
from sparseflow_kernels import spiking_conv2d  # noqa: E402
from sparseflow_kernels.tiling import TMA_CONFIGS, spiking_configs  # noqa: E402

BIN = Path(triton.__file__).parent / "backends/nvidia/bin"


class _Hopper:
    """The driver Triton asks for its target: an sm_90 GPU, so that kernels compile without one."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _Compiled(Exception):
    def __init__(self, kernel):
        self.kernel = kernel


class _CompileOnly:
    """``launch(kernel)[grid](*args)`` that compiles the kernel for the target and stops (``pdl``: as launched with
    programmatic dependent launch)."""

    pdl = False
    #: a list: each launched kernel is compiled into it and the call goes on (a call that launches several)
    collected = None

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if self.pdl and "PDL" in self.kernel.arg_names:
                kwargs.update(PDL=True, launch_pdl=True)
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            if _CompileOnly.collected is None:
                raise _Compiled(compiled)
            _CompileOnly.collected.append((self.kernel.fn.__name__, compiled))
        return run


def compile_tiling(name: str, C: int, CO: int, H: int, T: int, N: int, residual: bool, write_sum: bool = False,
                   pool: bool = False, static: bool = False, k: int = 3, stride: int = 1):
    cfg = spiking_configs(C, CO, T, tma=True)[name]
    cl = torch.channels_last
    if static:
        x = torch.zeros(N, C, H, H, dtype=torch.float16).to(memory_format=cl).expand(T, N, C, H, H)
    else:
        x = torch.zeros(T * N, C, H, H, dtype=torch.float16).to(memory_format=cl).view(T, N, C, H, H)
    OH = (H + 2 * (k // 2) - k) // stride + 1
    res = torch.zeros(T * N, CO, OH, OH, dtype=torch.float16).to(memory_format=cl).view(T, N, CO, OH, OH)
    try:
        spiking_conv2d(x, torch.zeros(CO, C, k, k, dtype=torch.float16), None, stride, k // 2, scale=torch.ones(CO),
                       shift=torch.zeros(CO), config=cfg, residual=res if residual or write_sum else None, neuron="lif",
                       tau=2.0, v_threshold=1.0, return_sum=write_sum, pool=(2, 2, 0) if pool else None)
    except _Compiled as done:
        return cfg, done.kernel
    raise RuntimeError(f"{name}: the launcher returned without launching")


def compile_neuron(C: int, H: int, T: int, N: int, residual: bool):
    x = torch.zeros(T * N, C, H, H, dtype=torch.float16).to(memory_format=torch.channels_last).view(T, N, C, H, H)
    res = torch.zeros(T, N, C, H, H, dtype=torch.float16) if residual else None
    try:
        kneuron.multistep_neuron(x, "lif", tau=2.0, scale=torch.ones(C), shift=torch.zeros(C), residual=res,
                                 return_sum=residual)
    except _Compiled as done:
        return done.kernel
    raise RuntimeError("neuron: the launcher returned without launching")


def compile_neuron_pool(C: int, H: int, T: int, N: int, overlap: bool) -> list:
    """[(kernel name, compiled kernel)] of every kernel ``multistep_neuron_pool`` launches for this map (its rule's
    order: two kernels for ``bits``)."""
    x = torch.zeros(T * N, C, H, H, dtype=torch.float16).to(memory_format=torch.channels_last).view(T, N, C, H, H)
    _CompileOnly.collected = []
    try:
        kneuron_pool.multistep_neuron_pool(x, "lif", tau=2.0, scale=torch.ones(C), shift=torch.zeros(C),
                                           kernel_size=3 if overlap else 2, stride=2, padding=1 if overlap else 0,
                                           return_v=True)
        return _CompileOnly.collected
    finally:
        _CompileOnly.collected = None


def resources(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        info = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", src, "-o", cubin], capture_output=True,
                              text=True, check=True).stderr
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"regs": int(regs.group(1)) if regs else None, "spill": f"{spill.group(1)}/{spill.group(2)}" if spill else "",
            "smem": kernel.metadata.shared, "warps": kernel.metadata.num_warps, "sass": len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass)),
            **{op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "HMMA", "BAR", "STS", "LDS", "LDSM", "SHFL")},
            "GDC": len(re.findall(r"^\s*griddepcontrol\.", ptx, re.M))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("specs", nargs="*", help="name:C:CO:H[:r|:s|:p|:t] (default: every TMA tiling on every layer shape)")
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--N", type=int, default=8)
    p.add_argument("--k", type=int, default=3, help="the convolution's kernel size (padding k // 2)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--pdl", action="store_true", help="compile with programmatic dependent launch (PDL=True)")
    a = p.parse_args(argv)
    _CompileOnly.pdl = a.pdl
    specs = a.specs or [f"{n}:{c}:{c}:{h}{r}" for c, h in SHAPES for n in TMA_CONFIGS for r in ("", ":r")]
    driver.set_active(_Hopper())
    kconv.launch = kneuron.launch = kneuron_pool.launch = _CompileOnly  # compile, never run
    kconv.tma_supported = lambda *args, **kwargs: True  # (no GPU to ask)
    kneuron_pool.multiprocessors = lambda device: 132  # (an H200's, for the tile the launcher picks)
    kspiking.require_triton_device = kneuron.require_triton_device = kneuron_pool.require_triton_device = \
        lambda op, *tensors: tensors[0].device
    print(f"triton {triton.__version__}, sm_90a, T={a.T}, N={a.N}" + (", PDL" if a.pdl else ""))
    cols = ("regs", "spill", "smem", "sass", "HGMMA", "HMMA", "BAR", "STS", "LDS", "LDSM", "SHFL", "GDC")
    print("| tiling | C / CO / map | residual | warps | " + " | ".join(cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for spec in specs:
        name, C, CO, H, *flag = spec.split(":")
        if name == "neuron":
            r = resources(compile_neuron(int(C), int(H), a.T, a.N, flag == ["r"]))
            print(f"| neuron | {C} / {CO} / {H} | {'yes' if flag else 'no'} | 4 | "
                  + " | ".join(str(r[c]) for c in cols) + " |")
            continue
        if name == "pool":
            for kname, kernel in compile_neuron_pool(int(C), int(H), a.T, a.N, flag == ["3"]):
                r = resources(kernel)
                print(f"| neuron + max pool {'3/2/1' if flag else '2/2'}: `{kname}` | {C} / {CO} / {H} | no | "
                      f"{r['warps']} | " + " | ".join(str(r[c]) for c in cols) + " |")
            continue
        if name not in spiking_configs(int(C), int(CO), a.T, tma=True):
            continue  # (a tiling wider than the layer's output channels, or with T in M where T > 8)
        cfg, kernel = compile_tiling(name, int(C), int(CO), int(H), a.T, a.N, flag == ["r"], flag == ["s"],
                                     flag == ["p"], flag == ["t"], a.k, a.stride)
        r = resources(kernel)
        res = {"r": "yes", "s": "yes, sum written", "p": "no, spikes pooled",
               "t": "no, static input"}.get(flag[0] if flag else "", "no")
        print(f"| {name} | {C} / {CO} / {H} | {res} | {cfg.num_warps} | "
              + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
