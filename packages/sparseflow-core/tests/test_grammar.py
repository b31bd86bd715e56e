"""Property test over generated networks: ``optimize()`` never changes what a model computes.

Hypothesis draws small SpikingJelly nets from the grammar of ``sf_grammar.py`` (multi-step ``layer.*`` nets and
single-step loops; plain, SeqToANNContainer, spiking-ResNet and SEW residual blocks with and without broadcasting,
shared neurons and BatchNorms, reused blocks, max pools; LIF / IF / PLIF; five BatchNorm variants), registers
forward hooks that record values before and after ``optimize()``, and compares the optimized model with a deep copy
of the dense one on fresh random non-binary inputs: a first call, a second call without reset, a call after
``reset_net``, a call in ``train()`` mode (both models, the same RNG state) and one back in ``eval()``. The hooks'
records must equal the dense model's too.

``numerics="faithful"``: equal bit for bit. ``"fast"``: within the fast-mode tolerance of the other optimize
tests (``compare_calls``: 1e-4), except where the dense model has a neuron whose charged membrane lies within
fp32 rounding (1e-4) of its threshold at some step so far: a spike there may flip, and the example is not judged.

Seed: ``SPARSEFLOW_GRAMMAR_SEED`` if set, else a random one drawn once per run (``conftest.py``); it is shown in the
report header and in every failure message, and hypothesis prints the ``@reproduce_failure`` blob of a failing
example.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from sf_grammar import BLOCKS, build, min_tie_distance, net_specs, reset

from sparseflow_core import optimize

SEED = int(os.environ.get("SPARSEFLOW_GRAMMAR_SEED") or random.SystemRandom().randrange(2**32))
SETTINGS = dict(deadline=None, derandomize=False, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = 1e-4  # compare_calls' tolerance for fast mode; also the threshold-tie distance (assert_spikes_match's)


HOOK_KINDS = ("none", "before", "after", "both")


def _hook_targets(net):
    """Names of the modules a user would hook: neurons, BatchNorms, convolutions and blocks."""
    return [n for n, m in net.named_modules() if n and not isinstance(m, torch.nn.Sequential)]


def _record(net, names, store):
    def make(name):
        def hook(m, args, out):
            store.setdefault(name, []).append(out.detach().clone() if isinstance(out, torch.Tensor) else out)
        return hook

    return [net.get_submodule(n).register_forward_hook(make(n)) for n in names]


def _note(msg: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a hypothesis test (the explicit cases)
        note(msg)


def _close(a, b, numerics) -> bool:
    if a.shape != b.shape:
        return False
    if numerics == "faithful":
        return torch.equal(a, b)
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=TOL, atol=TOL)


def check_net(spec, data_hooks, hook_names_pick):
    """Build ``spec``'s net and compare the optimized model with the dense one over five calls."""
    _note(f"grammar seed {SEED}; net {spec}")
    net, shape = build(spec)
    numerics = spec["numerics"]
    dense = copy.deepcopy(net)
    work = copy.deepcopy(net)
    targets = _hook_targets(net)
    hooked = [n for i, n in enumerate(targets) if hook_names_pick(i)] if data_hooks != "none" else []
    rec_dense, rec_opt = {}, {}
    _record(dense, hooked, rec_dense)
    if data_hooks in ("before", "both"):
        _record(work, hooked, rec_opt)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    x0 = torch.randn(shape, generator=gen)
    # fast mode with mode="torch": the same replacements, fusions and neuron kernels, with the convolutions on
    # torch (the conv kernels' own property tests cover them; under the interpreter they would take minutes here)
    opt = optimize(work, x0, numerics=numerics, mode="torch" if numerics == "fast" else "auto")
    rec_opt.clear()  # (optimize's analysis forward ran the hooks registered before it; judged: the calls below)
    if data_hooks == "after":
        _record(opt, hooked, rec_opt)
    elif data_hooks == "both":  # a second recorder registered after optimize on the same modules
        rec_after = {}
        _record(opt, hooked, rec_after)
    snapshots = []
    with torch.no_grad():
        for call in ("first", "second without reset", "after reset_net", "train()", "eval() again"):
            x = torch.randn(shape, generator=gen) * 1.5 + 0.3
            if call == "after reset_net":
                reset(dense)
                reset(opt)
            if call == "train()":
                dense.train()
                opt.train()
            if call == "eval() again":
                dense.eval()
                opt.eval()
            snapshots.append((copy.deepcopy(dense), x))
            rng = torch.get_rng_state()
            ref = dense(x)
            torch.set_rng_state(rng)
            y = opt(x)
            if _close(y, ref, numerics):
                continue
            if numerics == "fast":  # a spike at a threshold tie may flip in fast mode: not judged
                dist = min(min_tie_distance(s, xi) for s, xi in snapshots)
                if dist <= TOL:
                    _note(f"{call}: outputs differ, explained by a threshold tie (|h - v_th| = {dist:.2e})")
                    return
            err = (y.double() - ref.double()).abs().max().item() if y.shape == ref.shape else "shape"
            raise AssertionError(f"[seed {SEED}] {call} call ({numerics}): output differs from the dense model "
                                 f"(max |diff| {err}); net {spec}")
    for name in hooked:
        got, want = rec_opt.get(name, []), rec_dense.get(name, [])
        assert len(got) == len(want), (f"[seed {SEED}] hook on {name!r} ({data_hooks} optimize) recorded "
                                       f"{len(got)} values, the dense model {len(want)}; net {spec}")
        for i, (a, b) in enumerate(zip(got, want)):
            assert _close(a, b, numerics), (f"[seed {SEED}] hook on {name!r} ({data_hooks} optimize), record {i}: "
                                            f"differs from the dense model's; net {spec}")
        if data_hooks == "both":
            after = rec_after.get(name, [])
            assert len(after) == len(want) and all(_close(a, b, numerics) for a, b in zip(after, want)), (
                f"[seed {SEED}] hook registered after optimize on {name!r} differs from the dense model's; net {spec}")


def _run(data, kinds, step, hooks):
    spec = data.draw(net_specs(kinds=kinds, step=step), label="net")
    hook_kind = data.draw(hooks, label="hooks")
    mask = data.draw(st.integers(1, 2**12 - 1), label="hooked modules")
    check_net(spec, hook_kind, lambda i: bool(mask >> (i % 12) & 1))

NO_HOOKS = st.just("none")
ANY_HOOKS = st.sampled_from(HOOK_KINDS)


@seed(SEED)
@settings(max_examples=50, **SETTINGS)
@given(st.data())
def test_grammar_plain_and_residual(data):
    """Plain chains, SeqToANNContainer, residual adds before / after the neuron, broadcast or not, pools."""
    _run(data, ("plain", "seq", "add_before", "add_after", "pool"), "m", NO_HOOKS)


@seed(SEED)
@settings(max_examples=45, **SETTINGS)
@given(st.data())
def test_grammar_shared_and_reused(data):
    """The same neuron, BatchNorm or block called in two chains."""
    _run(data, ("shared_neuron", "shared_bn", "reuse", "plain", "add_after"), "m", NO_HOOKS)


@seed(SEED)
@settings(max_examples=60, **SETTINGS)
@given(st.data())
def test_grammar_hooks(data):
    """Forward hooks registered before and/or after optimize() record what the dense model's hooks record."""
    _run(data, BLOCKS, "m", ANY_HOOKS)


@seed(SEED)
@settings(max_examples=45, **SETTINGS)
@given(st.data())
def test_grammar_single_step_loops(data):
    """A forward that loops over T calling single-step modules."""
    _run(data, BLOCKS, "s", st.sampled_from(("none", "none", "before", "after")))


# ------------------------------------------------------------------------------- minimal failing structures
LIF = {"kind": "lif", "v_threshold": 1.0, "v_reset": 0.0, "tau": 2.0, "decay_input": True}
LIF_ND = {**LIF, "decay_input": False}


def _spec(blocks, numerics="fast", stem_bn="default", stem_sn=LIF, sn=LIF, seed=0, C=2, H=4, W=4):
    return {"step": "m", "C": C, "H": H, "W": W, "stem_bn": stem_bn, "stem_sn": stem_sn, "numerics": numerics,
            "seed": seed, "blocks": [{"bn": "default", "sn": sn, "sn2": sn, "res": "same", **b} for b in blocks]}


#: small nets of each structure the generator found failing: (spec, hooks, hooked module names)
REPRODUCERS = {
    "broadcast-residual-before-neuron": (_spec([{"kind": "add_before", "res": "channel"}]), "none", ()),
    "broadcast-residual-after-neuron": (_spec([{"kind": "add_after", "res": "param"}]), "none", ()),
    "bn-without-running-stats": (_spec([{"kind": "plain", "bn": "no_running_stats"}]), "none", ()),
    "shared-neuron-faithful": (_spec([{"kind": "shared_neuron"}], numerics="faithful"), "none", ()),
    "shared-neuron-fast": (_spec([{"kind": "shared_neuron"}], stem_sn=LIF_ND, sn=LIF_ND), "none", ()),
    "reused-block-train-then-eval": (_spec([{"kind": "reuse"}], stem_sn=LIF_ND, sn=LIF_ND), "none", ()),
    "hook-after-optimize-on-fused-conv": (_spec(
        [{"kind": "plain", "bn": "affine_false", "sn": {"kind": "lif", "v_threshold": 0.5, "v_reset": None,
                                                        "tau": 2.0, "decay_input": False}},
         {"kind": "plain", "bn": "affine_false", "sn": {"kind": "plif", "v_threshold": 0.5, "v_reset": None,
                                                        "init_tau": 3.0}}],
        stem_bn="momentum_none", stem_sn={"kind": "lif", "v_threshold": 0.5, "v_reset": None, "tau": 3.0,
                                          "decay_input": False}, seed=10328, W=5), "after", ("3.conv",)),
}


@pytest.mark.parametrize("case", list(REPRODUCERS))
def test_grammar_reproducers(case):
    spec, hooks, names = REPRODUCERS[case]
    net, _ = build(spec)
    targets = _hook_targets(net)
    check_net(spec, hooks, lambda i: targets[i] in names)
