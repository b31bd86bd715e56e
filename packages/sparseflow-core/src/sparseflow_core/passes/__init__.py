"""The passes of ``optimize()``, in the order they run on one :class:`~.state.OptimizeState`.

1. ``analyze``: one forward of a copy of the model records what flows where (the state is made here).
2. ``handlers``: modules with a registered op handler (Linear, attention, depthwise / transposed convolutions,
   max pools, spike-fed BatchNorms), outermost first.
3. ``chains``: ``nn.Conv2d`` (its handler, ``handlers/conv2d.py``) with the conv -> BN -> neuron chain after it.
4. ``residual``: ``neuron(bn(conv(x)) + identity)`` chains, fused by rewriting their block with fx.
5. ``skip_add``: ``neuron(bn(conv(x))) + identity``: the add into the fused layer's epilogue.
6. ``sum_neurons``: ``bn(conv(x)) + identity`` read by a neuron elsewhere (MS-ResNet's residual stream): the add
   and that neuron's spikes in one kernel of the layer writing the sum; then ``chains.settle_chains`` (folded
   BatchNorms out of the report, measured block sizes installed).
7. ``neurons``: the remaining spiking neurons on the multi-step Triton kernel.
8. ``static_frames``: containers of frame-wise modules (Spikformer's ``SeqToANNContainer`` patch stem) run them
   on one frame per sample when the input repeats over the steps by stride 0.
9. ``occupancy``: fused layers write the occupancy of their spikes for sparse consumers (opt-in).
10. ``numerics``: ``numerics="faithful"`` set on every SparseFlow module, or folded biases deferred to max pools.
11. ``report``: every compute layer accounted for, in model order.

The op handlers (2) run before the chains (3): the chains pass then sees the modules handlers kept as children
(the 1x1 convolutions of spike-driven attention), and spike-fed BatchNorms are the handlers' while BatchNorms after
a convolution are the chains'.
"""

from __future__ import annotations

from .analyze import analyze_model
from .chains import fuse_chains, settle_chains
from .handlers import run_handlers
from .neurons import accelerate_neurons
from .numerics import set_numerics
from .occupancy import write_occupancy
from .report import finish_report
from .residual import fuse_residual_chains
from .skip_add import fuse_skip_adds
from .state import OptimizeState, Options, parent_and_child
from .static_frames import run_static_frames
from .sum_neurons import fuse_sum_neurons

#: the passes after the analysis, in order; each takes the OptimizeState
PIPELINE = (run_handlers, fuse_chains, fuse_residual_chains, fuse_skip_adds, fuse_sum_neurons, settle_chains,
            accelerate_neurons, run_static_frames, write_occupancy, set_numerics, finish_report)

__all__ = ["PIPELINE", "OptimizeState", "Options", "analyze_model", "parent_and_child"]
