"""Membrane state across calls on SpikingJelly's QKFormer (fused projections, Q-K token attention, SSA, patch
embeddings with max pools and shortcut chains), with ``mode="auto"``'s path timing emulated on the CPU.

On the GPU each layer times its candidate paths on its first call (``sparseflow_kernels.dispatch.choose``); a
candidate that wrote a neuron's membrane would leave the state advanced by the timing runs, and the second call
without ``reset_net`` would drift from the dense model while the first stays exact. Here ``choose`` runs every
candidate twice before picking one, as the timing does, and the optimized model must give the dense logits and
membranes on a first call, a second call without reset and a call after ``reset_net``, whichever path is picked.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from test_model_zoo import first_state_difference, recalibrate

from sparseflow_core import optimize
from sparseflow_kernels import dispatch


@pytest.fixture
def timed_choice(monkeypatch):
    """``dispatch.choose`` that calls every candidate twice (as the CUDA timing does) and picks ``pick[0]``."""
    pick = ["cudnn"]
    calls = []

    def choose(key, candidates, fallback, device=None):
        hit = dispatch.cached(key)
        if hit is not None:
            return hit
        for fn in candidates.values():
            fn()
            fn()
        best = pick[0] if pick[0] in candidates else fallback
        dispatch.set_choice(key, best)
        calls.append((key[0], best))
        return best

    dispatch.clear_cache()
    monkeypatch.setattr(dispatch, "choose", choose)
    yield pick, calls
    dispatch.clear_cache()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("pick", ["cudnn", pytest.param("fused_dense", marks=[pytest.mark.slow, pytest.mark.skipif(
    not os.environ.get("SPARSEFLOW_SLOW"), reason="a minute of interpreter: SPARSEFLOW_SLOW=1 runs it")])])
def test_qkformer_state_carried_with_timed_paths(timed_choice, pick):
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.model.qkformer import QKFormer

    timed_choice[0][0] = pick
    torch.manual_seed(0)
    net = QKFormer(T=2, embed_dims=8, num_heads=(1, 1, 2), depths=(1, 1, 1), num_classes=5)
    functional.set_step_mode(net, "m")
    x = torch.rand(2, 3, 16, 16) * 2
    recalibrate(net.eval(), x)
    dense = copy.deepcopy(net)
    opt = optimize(copy.deepcopy(net), x, mode="auto")
    with torch.no_grad():
        for call in ("first", "second without reset", "after reset_net"):
            if call == "after reset_net":
                functional.reset_net(dense)
                functional.reset_net(opt)
            ref, y = dense(x), opt(x)
            assert ref.abs().max() > 0
            err = float((y - ref).abs().max() / ref.abs().max())
            assert err <= 1e-4, f"{call}: relative error {err:.2e}; {first_state_difference(opt, dense, False)}"
            assert first_state_difference(opt, dense, exact=False) is None, call
    assert timed_choice[1], "no path was timed: the emulation did not run"
