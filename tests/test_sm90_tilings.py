"""``scripts/sm90_tilings.py`` compiles the fused convolution's tilings and the neuron kernel for sm_90a without a
GPU. Checked here on two tilings with T in the GEMM's M: the script's table, and what the epilogue that picks each
step's rows compiles to (no register spills, no shuffles), with a residual and without; the 128-row tile on wgmma,
the 32-row one on mma.sync; the neuron kernel at each chunk of steps it loads at once; and both compiled for
programmatic dependent launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _table(*args: str) -> tuple[str, list[dict]]:
    """Run the script on ``args``: (its first line, its table's rows as {column: cell})."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/sm90_tilings.py"), *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    head = [c.strip() for c in lines[1].strip("|").split("|")]
    return lines[0], [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[3:]]


def test_tilings_compile_for_sm90_without_spills():
    first, rows = _table("tma_tm_4x8_n128:256:256:14", "tma_tm_4x8_n128:256:256:14:r", "tma_tm_2x4:64:64:56:r")
    assert first.startswith("triton ") and "sm_90a, T=4, N=8" in first
    assert [(r["tiling"], r["residual"]) for r in rows] == [("tma_tm_4x8_n128", "no"), ("tma_tm_4x8_n128", "yes"),
                                                           ("tma_tm_2x4", "yes")]
    for r in rows:
        assert 0 < int(r["regs"]) <= 255 and int(r["smem"]) > 0 and int(r["sass"]) > 0, r
        assert r["spill"] == "0/0" and r["SHFL"] == "0", r
    assert int(rows[0]["HGMMA"]) > 0 and int(rows[0]["warps"]) == 8
    assert int(rows[2]["HMMA"]) > 0 and rows[2]["HGMMA"] == "0"


def test_neuron_kernel_compiles_for_sm90_at_every_step_chunk():
    """The multi-step neuron kernel loads several steps at once (4 or 8, where they divide T; else one): it compiles
    for sm_90a without spills or shuffles, also as a sum kernel whose residual comes in the other memory order (NCHW
    against channels_last), which Triton 3.6's layout pass failed on for chunks of two."""
    for T in (2, 4, 16):
        _, rows = _table("neuron:64:64:14", "neuron:64:64:14:r", "--T", str(T))
        assert [(r["tiling"], r["residual"]) for r in rows] == [("neuron", "no"), ("neuron", "yes")], (T, rows)
        for r in rows:
            assert r["spill"] == "0/0" and r["SHFL"] == "0" and int(r["sass"]) > 0, (T, r)


def test_pdl_kernels_wait_for_the_previous_kernel():
    """``--pdl``: the kernels compiled as they launch with programmatic dependent launch hold the wait for the previous
    kernel and the release of the next (two ``griddepcontrol`` instructions) at about the registers they take without
    it (the same with Triton 3.6 and 3.8); without, none."""
    first, on = _table("tma_tm_2x4:64:64:56:r", "neuron:64:64:14", "--pdl")
    assert first.endswith(", PDL")
    _, off = _table("tma_tm_2x4:64:64:56:r", "neuron:64:64:14")
    assert [r["GDC"] for r in on] == ["2", "2"] and [r["GDC"] for r in off] == ["0", "0"]
    for a, b in zip(on, off):
        assert int(a["regs"]) <= int(b["regs"]) + 2 and a["spill"] == "0/0", (a, b)


def test_neuron_pool_kernels_compile_for_sm90_without_spills():
    """The neuron + max pool of a ResNet stem's overlapping 3 / 2 / 1 windows runs two kernels (the neuron once per
    pixel into one bit per step, then the pool of the bits), a DVS map's 2 / 2 one: a row for each, no spill."""
    _first, rows = _table("pool:64:64:112:3", "pool:128:128:32")
    assert [r["tiling"] for r in rows] == ["neuron + max pool 3/2/1: `_neuron_bits_kernel`",
                                           "neuron + max pool 3/2/1: `_pool_bits_kernel`",
                                           "neuron + max pool 2/2: `_neuron_pool_kernel`"]
    for r in rows:
        assert 0 < int(r["regs"]) <= 255 and int(r["sass"]) > 0 and r["spill"] == "0/0", r
