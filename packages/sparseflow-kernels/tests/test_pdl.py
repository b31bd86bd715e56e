"""Programmatic dependent launch (PDL, sm_90+): the switch (``set_pdl``, ``SPARSEFLOW_PDL``) and the device rule
(``pdl_enabled``), the launcher passing ``PDL=True, launch_pdl=True`` on eager launches only, and every kernel of the
package declaring ``PDL`` (last, default False) and waiting for the previous kernel (``pdl_enter(PDL)``) as the first
statement of its body: a program that loaded, stored or returned before it would break the ordering between
kernels. On an sm_90+ GPU, a chain of kernels gives the same bits with PDL and without, eagerly and in a CUDA graph."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import textwrap

import pytest
import torch
from kernel_checks import poison_allocations
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import sparseflow_kernels
from sparseflow_kernels import _utils, multistep_neuron, pdl_enabled, set_pdl


@pytest.fixture
def pdl_switch():
    """The switch as it was before the test, restored after it."""
    previous = _utils._PDL
    try:
        yield
    finally:
        set_pdl(previous)


def _modules():
    mods = []
    for info in pkgutil.iter_modules(sparseflow_kernels.__path__):
        mods.append(importlib.import_module(f"sparseflow_kernels.{info.name}"))
    return mods


def _kernels() -> dict:
    """Every Triton kernel of the package (``_<name>_kernel``; jit helpers are named otherwise): JITFunction, or
    InterpretedFunction under ``TRITON_INTERPRET=1``."""
    found = {}
    for mod in _modules():
        for obj in vars(mod).values():
            if isinstance(obj, (JITFunction, InterpretedFunction)):
                name = obj.fn.__name__
                if name.startswith("_") and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                    found[f"{mod.__name__}.{name}"] = obj
    return found


KERNELS = _kernels()


def test_the_kernels_are_found():
    names = {k.rsplit(".", 1)[1] for k in KERNELS}
    assert {"_conv_kernel", "_multistep_kernel", "_prescan_kernel", "_max_pool2d_kernel", "_snntorch_step_kernel",
            "_ssa_kernel", "_channel_dot_kernel", "_qk_token_kernel"} <= names, names
    assert len(KERNELS) >= 14


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_declares_pdl_last_default_false(name):
    k = KERNELS[name]
    assert "PDL" in k.arg_names, f"{name} has no PDL parameter"
    params = list(inspect.signature(k.fn).parameters.values())
    assert params[-1].name == "PDL", f"{name}: PDL must be the last parameter"
    assert params[-1].default is False, f"{name}: PDL must default to False"
    assert "constexpr" in str(params[-1].annotation), f"{name}: PDL must be a tl.constexpr"


def _body(fn) -> list:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return body


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_every_kernel_waits_for_the_previous_one_first(name):
    """``pdl_enter(PDL)`` is the first statement: before any load, store, atomic, descriptor or early return."""
    first = _body(KERNELS[name].fn)[0]
    ok = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Call)
          and isinstance(first.value.func, ast.Name) and first.value.func.id == "pdl_enter"
          and [a.id for a in first.value.args if isinstance(a, ast.Name)] == ["PDL"]
          and len(first.value.args) == 1 and not first.value.keywords)
    assert ok, f"{name}: the first statement must be pdl_enter(PDL), got {ast.unparse(first)!r}"


def test_pdl_enter_waits_then_releases():
    from sparseflow_kernels._epilogue_jit import pdl_enter

    src = inspect.getsource(pdl_enter.fn)
    assert 0 < src.index("gdc_wait()") < src.index("gdc_launch_dependents()")


def test_kernels_launch_through_launch():
    """No module launches a kernel directly (``_x_kernel[grid](...)``): ``launch`` is what passes PDL."""
    for mod in _modules():
        src = inspect.getsource(mod)
        direct = [m.group(0) for m in re.finditer(r"(?<!launch\()\b_\w+_kernel\[", src)]
        assert not direct, f"{mod.__name__} launches {direct} without launch()"


def test_switch_and_device_rule(pdl_switch):
    previous = set_pdl(True)
    assert set_pdl(False) is True
    assert _utils._PDL is False
    assert set_pdl(True) is False
    assert _utils._PDL is True
    set_pdl(previous)
    # the CPU, and the interpreter, never
    assert not pdl_enabled(torch.device("cpu"))
    assert not pdl_enabled("cpu")
    if _utils.interpreter_active():
        assert not pdl_enabled(torch.device("cuda", 0))


def test_env_default(monkeypatch):
    monkeypatch.delenv("SPARSEFLOW_PDL", raising=False)
    assert _utils._env_pdl() is False
    monkeypatch.setenv("SPARSEFLOW_PDL", "0")
    assert _utils._env_pdl() is False
    monkeypatch.setenv("SPARSEFLOW_PDL", "1")
    assert _utils._env_pdl() is True


def test_device_rule_on_a_cuda_device(monkeypatch, pdl_switch):
    """sm_90+ only (capability cached per device), and only with the switch on and no interpreter."""
    caps = {0: (9, 0), 1: (8, 0)}
    asked = []

    def capability(device):
        asked.append(device)
        return caps[device.index]

    monkeypatch.setattr(_utils, "interpreter_active", lambda: False)
    monkeypatch.setattr(_utils, "_PDL_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    set_pdl(True)
    assert pdl_enabled(torch.device("cuda", 0))
    assert pdl_enabled(torch.device("cuda", 0))
    assert not pdl_enabled(torch.device("cuda", 1))
    assert len(asked) == 2
    set_pdl(False)
    assert not pdl_enabled(torch.device("cuda", 0))
    set_pdl(True)
    monkeypatch.setattr(_utils, "interpreter_active", lambda: True)
    assert not pdl_enabled(torch.device("cuda", 0))


class _FakeKernel:
    """Records the keyword arguments of its launches."""

    def __init__(self, arg_names):
        self.arg_names = arg_names
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(kwargs)
        return run


def test_launcher_passes_pdl_on_eager_launches_only(monkeypatch, pdl_switch):
    """Eager: ``PDL=True, launch_pdl=True`` where the switch is on, the kernel declares PDL and the device has it;
    traced (``wrap_triton``) launches and kernels without PDL get neither."""
    monkeypatch.setattr(_utils, "interpreter_active", lambda: False)
    set_pdl(True)
    traced_calls = []

    class _Wrapped:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                traced_calls.append(kwargs)
            return run

    monkeypatch.setattr(torch.library, "wrap_triton", _Wrapped)
    on = {"value": True}
    monkeypatch.setattr(_utils, "_pdl_capable", lambda device: on["value"])
    x = torch.zeros(4)
    with_pdl, without = _FakeKernel(["x_ptr", "N", "BLOCK", "PDL"]), _FakeKernel(["x_ptr", "N", "BLOCK"])
    _utils._Launch(with_pdl)[(1,)](x, 4, BLOCK=4)
    _utils._Launch(without)[(1,)](x, 4, BLOCK=4)
    assert with_pdl.calls == [{"BLOCK": 4, "PDL": True, "launch_pdl": True}]
    assert without.calls == [{"BLOCK": 4}]
    on["value"] = False  # a device without PDL
    _utils._Launch(with_pdl)[(1,)](x, 4, BLOCK=4)
    assert with_pdl.calls[-1] == {"BLOCK": 4}
    on["value"] = True
    set_pdl(False)  # the switch off, the device able
    _utils._Launch(with_pdl)[(1,)](x, 4, BLOCK=4)
    assert with_pdl.calls[-1] == {"BLOCK": 4}
    set_pdl(True)
    monkeypatch.setattr(_utils, "_traced", lambda args: True)
    _utils._Launch(with_pdl)[(1,)](x, 4, BLOCK=4)
    assert traced_calls == [{"BLOCK": 4}] and len(with_pdl.calls) == 3


def test_interpreted_launch_with_the_switch_on(pdl_switch):
    """Under the interpreter the switch changes nothing: the kernels run as without it."""
    launcher = _utils.launch(sparseflow_kernels.neuron._multistep_kernel)
    assert launcher.pdl is (not _utils.interpreter_active())
    x = torch.randn(3, 2, 4, 3, 3) + 0.5
    set_pdl(False)
    off_s, off_v = multistep_neuron(x, "lif", tau=2.0, return_v=True)
    set_pdl(True)
    on_s, on_v = multistep_neuron(x, "lif", tau=2.0, return_v=True)
    assert torch.isfinite(on_s).all() and torch.isfinite(on_v).all()
    assert torch.equal(on_s, off_s) and torch.equal(on_v, off_v)


# ------------------------------------------------------------------------------------------------------ GPU


def _chain(xs, w, scale, shift):
    """A spiking conv (fused kernel), a sparse conv of its spikes (prescan + conv kernel), a neuron (multi-step
    kernel), a max pool and a neuron again, each kernel reading the previous one's output."""
    from sparseflow_kernels import sparse_conv2d
    from sparseflow_kernels.pool import max_pool2d
    from sparseflow_kernels.spiking import spiking_conv2d

    T, N = xs.shape[:2]
    s1, v1 = spiking_conv2d(xs, w, None, 1, 1, scale=scale, shift=shift, return_v=True, neuron="lif", tau=2.0)
    y = sparse_conv2d(s1.flatten(0, 1), w, None, 1, 1, scale=scale, shift=shift)
    s2, v2 = multistep_neuron(y.view(T, N, *y.shape[1:]), "lif", tau=2.0, return_v=True)
    p = max_pool2d(s2.flatten(0, 1), 2)
    s3, v3 = multistep_neuron(p.view(T, N, *p.shape[1:]) * 1.5, "if", return_v=True)
    return s1, v1, y, s2, v2, p, s3, v3


def _launched_with_pdl(kernel) -> bool:
    return any(getattr(c.metadata, "launch_pdl", False)
               for cache in kernel.device_caches.values() for c in cache[0].values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _utils.interpreter_active()
                    or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs an sm_90+ GPU")
def test_chain_with_pdl_is_bit_identical_eager_and_in_a_cuda_graph(monkeypatch, pdl_switch):
    from kernel_checks import same_conv_layer

    poison_allocations(monkeypatch)
    dev = torch.device("cuda")
    xs, w, scale, shift, _ = same_conv_layer(dev, 4, 4, 64, 64, 16, 16, 3, torch.float16, 11)

    set_pdl(False)
    assert not pdl_enabled(dev)
    ref = _chain(xs, w, scale, shift)
    torch.cuda.synchronize()
    for t in ref:
        assert not t.isnan().any()
    assert ref[0].any() and ref[3].any()  # (spikes in the chain)

    set_pdl(True)
    assert pdl_enabled(dev)
    for _ in range(5):
        got = _chain(xs, w, scale, shift)
        torch.cuda.synchronize()
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
    for k in (sparseflow_kernels.conv._conv_kernel, sparseflow_kernels.neuron._multistep_kernel,
              sparseflow_kernels.occupancy._prescan_kernel, sparseflow_kernels.pool._max_pool2d_kernel):
        assert _launched_with_pdl(k), k.fn.__name__

    for enabled in (True, False):
        set_pdl(enabled)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # (warm-up off the capture's stream)
            _chain(xs, w, scale, shift)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _chain(xs, w, scale, shift)
        for _ in range(5):
            for t in outs:
                t.fill_(float("nan"))  # poisoned before every replay
            graph.replay()
            torch.cuda.synchronize()
            for a, b in zip(outs, ref):
                assert torch.equal(a, b), enabled
