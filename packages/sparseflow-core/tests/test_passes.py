"""The pass pipeline of ``optimize()``: ``nn.Conv2d`` runs through the handler registry like every other op (a
handler a user registers for it takes over), handler stages are checked, and the hook check is SparseFlow's one."""

from __future__ import annotations

import pytest
from sf_core_nets import build_small_sj
from spikingjelly.activation_based import layer
from torch import nn

from sparseflow_core import OpHandler, find_op_handler, optimize, register_op_handler, unregister_op_handler
from sparseflow_core.handlers.conv2d import CONV2D_HANDLER
from sparseflow_core.hooks import module_hooks
from sparseflow_core.passes import PIPELINE
from sparseflow_ops import SparseConv2d


def test_conv2d_is_a_registered_handler_of_the_chains_stage():
    assert find_op_handler(nn.Conv2d(4, 4, 3)) is CONV2D_HANDLER
    assert find_op_handler(layer.Conv2d(4, 4, 3)) is CONV2D_HANDLER  # SpikingJelly's subclass
    assert find_op_handler(nn.Conv2d(4, 4, 3, groups=2)) is not CONV2D_HANDLER  # the grouped handler's
    assert CONV2D_HANDLER.stage == "chains"
    names = [p.__name__ for p in PIPELINE]
    assert names.index("run_handlers") < names.index("fuse_chains") < names.index("fuse_residual_chains") \
        < names.index("fuse_skip_adds") < names.index("accelerate_neurons") < names.index("finish_report")


def test_a_users_conv2d_handler_takes_over_from_the_chains():
    net, xs = build_small_sj()
    seen = []

    def decline(m, ctx):
        seen.append(ctx.name)
        return None, "declined by the user's handler"

    h = register_op_handler(nn.Conv2d, OpHandler("user-conv", decline, needs_spikes=False))
    try:
        net, rep = optimize(net, xs[0], return_report=True)
    finally:
        unregister_op_handler(h)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(seen) == sorted(convs) and len(convs) == 5
    assert not any(isinstance(m, SparseConv2d) for m in net.modules())
    by_name = {e.name: e for e in rep.layers}
    assert all(by_name[n].action == "left" and by_name[n].reason == "declined by the user's handler" for n in convs)
    assert find_op_handler(nn.Conv2d(4, 4, 3)) is CONV2D_HANDLER  # the built-in one again


def test_handler_stage_is_checked():
    with pytest.raises(ValueError, match="stage must be one of"):
        OpHandler("bad", lambda m, ctx: (None, ""), stage="late")


def test_module_hooks_ignores_only_sparseflows_own_pre_hooks():
    m = nn.Linear(2, 2)
    assert module_hooks(m) == ""
    optimize(m, dtype=None)  # (no spiking modules: the lazy optimization's pre-hook, which is not the user's)
    assert module_hooks(m) == ""
    h = m.register_forward_pre_hook(lambda mod, args: None)
    assert module_hooks(m) == "forward pre"
    h.remove()
