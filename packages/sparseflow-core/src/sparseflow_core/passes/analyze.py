"""Pass 1, analysis: one forward of a copy of the model records what flows where.

Input: the model, the example inputs (or the first real input), the :class:`~.state.Options`.
Output: a fresh :class:`~.state.OptimizeState` holding the :class:`~sparseflow_core.analyzer.Analysis` and a
report with the notes about the analysis itself (a model that could not be copied, bfloat16 on the CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from sparseflow_kernels import repeated_over_steps

from ..analyzer import analyze
from .state import OptimizeState, Options


def analyze_model(model: nn.Module, example_inputs, options: Options) -> OptimizeState:
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    an = analyze(model, example_inputs)
    st = OptimizeState(model, an, options, order=order)
    if not an.copied:
        st.report.notes.append(f"the model could not be deep-copied ({an.copy_error}): it was analysed itself and "
                               "its state (tensors, buffers, neuron memories, random generators) put back afterwards")
    if any(t.dtype == torch.bfloat16 and not t.is_cuda
           for t in (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
           if isinstance(t, torch.Tensor)):
        st.report.notes.append("bfloat16 on the CPU: the Triton interpreter cannot run bfloat16 kernels, so the "
                               "layers run their dense torch ops until they get CUDA tensors (bfloat16 kernels need "
                               "a GPU)")
    first = example_inputs[0] if isinstance(example_inputs, tuple) and example_inputs else example_inputs
    st.static_example = isinstance(first, torch.Tensor) and repeated_over_steps(first)
    if st.static_example:
        st.report.notes.append(
            f"static input: the input repeats one frame over its {first.shape[0]} steps by stride 0, so the "
            "spiking convolutions that read it (paths 'cudnn_static' and the fused kernel's '<tiling>_static') "
            "convolve each sample's frame once and run only the BatchNorm and the neuron over the steps; a "
            "convolution without a neuron (path '<path>_static') convolves the frame once and hands it on repeated "
            "by stride 0, so the layers after it do the same, a max pool included (equal inputs give equal "
            "convolutions, up to the rounding of another batch size)")
    return st
