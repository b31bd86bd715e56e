"""Pass 8, static frames: SpikingJelly's ``SeqToANNContainer`` of frame-wise modules (Spikformer's patch stem,
``Conv2d -> BatchNorm2d -> MaxPool2d`` on ``[T*N, ...]``) runs them on one frame per sample when the input repeats
over the steps by stride 0, and hands the result on repeated so (``sparseflow_ops.run_static_frames_once``).

Input: the model after the other passes (the containers' modules replaced by drop-ins, which stay frame-wise), and
the analysis: a container whose input descends from a spiking module is left as it is. Output: the other
containers' instance ``forward``; where the example input is static, a report note naming them and saying why any
other container runs every step. Not with ``numerics="faithful"`` (a convolution of N frames may
round differently from one of T*N).
"""

from __future__ import annotations

from sparseflow_ops import frame_wise_problem, run_static_frames_once

from ..handlers import static_writer
from .state import OptimizeState


def _seq_to_ann_types() -> tuple:
    try:
        from spikingjelly.activation_based.layer import SeqToANNContainer
    except Exception:  # SpikingJelly is optional
        return ()
    return (SeqToANNContainer,)


def _after_a_neuron(st: OptimizeState, name: str, container) -> bool:
    """Whether the container's input descends from a spiking module in the analysis forward (a Transformer's
    projection, a later stage of the patch stem): it then never reads a repeated frame."""
    first = next(iter(container._modules), None)
    calls = st.analysis.calls.get(f"{name}.{first}") or [] if first is not None else []
    return any(c.spike_source for c in calls)


def run_static_frames(st: OptimizeState) -> None:
    types = _seq_to_ann_types()
    if st.options.faithful or not types:
        return
    done, kept = [], []
    for name, m in st.model.named_modules():
        if not isinstance(m, types) or _after_a_neuron(st, name, m):
            continue
        # (the container's output is its last module's, viewed as [T, N, ...]: the analysis records leaf modules)
        why = frame_wise_problem(m) or static_writer(st.analysis, st.model, f"{name}.{next(reversed(m._modules))}")
        if why:
            kept.append(f"{name} ({why})")
            continue
        run_static_frames_once(m)
        done.append(name)
    if st.static_example and (done or kept):
        st.report.notes.append(
            "static input: " + (f"the frame-wise containers {', '.join(done)} run their modules on one frame per "
                                "sample and hand the result on repeated by stride 0" if done else "")
            + ("; " if done and kept else "") + (f"these run every step: {'; '.join(kept)}" if kept else ""))
