"""Kernel tests: output buffers the kernels allocate are poisoned (the interpreter and seeds come from the
root conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Output buffers the kernels allocate start as NaN (codes as -1) instead of uninitialised memory, so
    an element a kernel forgets to write shows up in the comparisons instead of passing by luck."""
    from sparseflow_kernels import neuron as kneuron
    from sparseflow_kernels import occupancy as kocc
    from sparseflow_kernels import snntorch_step as ksnn
    from sparseflow_kernels import sparse_conv as ksc
    from sparseflow_kernels import spiking as kspk

    def nan_fill(fn):
        def wrapper(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            else:
                t.fill_(-1)
            return t

        return wrapper

    monkeypatch.setattr(ksc, "empty_like_layout", nan_fill(ksc.empty_like_layout))
    monkeypatch.setattr(kspk, "new_spike_tensor", nan_fill(kspk.new_spike_tensor))
    monkeypatch.setattr(kspk, "new_membrane", nan_fill(kspk.new_membrane))
    monkeypatch.setattr(kspk, "new_frames", nan_fill(kspk.new_frames))
    monkeypatch.setattr(kspk, "empty_codes", nan_fill(kspk.empty_codes))
    monkeypatch.setattr(kocc, "empty_codes", nan_fill(kocc.empty_codes))
    monkeypatch.setattr(kneuron, "_empty_like_channels_last", nan_fill(kneuron._empty_like_channels_last))
    monkeypatch.setattr(ksnn, "new_output", nan_fill(ksnn.new_output))
    yield
