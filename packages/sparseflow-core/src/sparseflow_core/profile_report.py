"""The result of ``profile()``: :class:`LayerProfile` per layer, :class:`ProfileReport` for the model.

``report.table()`` (also ``print(report)``) is the terminal table; ``to_json()``, ``to_csv()`` and ``save(path)``
(by suffix: .json, .csv, anything else gets the table) write it. The measurement is in :mod:`.profiler`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field

from .sops import E_AC_J, E_MAC_J, theoretical_energy

CSV_COLUMNS = ["layer", "type", "calls", "in_shape", "ms", "dense_ms", "speedup", "elem_density", "block_size",
               "block_density", "skippable", "skipped", "macs", "path", "input", "sops", "firing_rate", "energy_j"]
KIND_ORDER = {"binary": 0, "graded": 1, "analog": 2}


@dataclass
class LayerProfile:
    name: str
    type: str
    calls: int = 0
    ms: float = 0.0
    elem_density: float | None = None
    block_density: float | None = None
    path: str | None = None
    block_size: int | None = None
    dense_ms: float | None = None
    macs: int | None = None
    in_shape: list | None = None
    sparse_module: bool = False
    input_kind: str | None = None  # "binary", "graded" (spike counts) or "analog" (Conv/Linear layers)
    sops: int | None = None  # synaptic operations per forward (spike-driven layers)
    firing_rate: float | None = None  # neuron layers: the fraction of their outputs that are spikes
    energy_j: float | None = None  # theoretical energy per forward (e_ac * sops or e_mac * macs)

    @property
    def spiking(self) -> bool:
        """The layer is spike-driven: its inputs are spikes or spike counts."""
        return self.input_kind in ("binary", "graded")

    @property
    def skippable(self) -> float | None:
        """The fraction of blocks that are all zero: the work a block-skipping kernel could drop."""
        return None if self.block_density is None else 1.0 - self.block_density

    @property
    def skipped(self) -> float | None:
        """The fraction of the layer's work its path skipped (0 for dense paths and plain dense modules)."""
        if self.block_density is None:
            return None
        return self.skippable if self.path and "sparse" in self.path else 0.0

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or not self.ms:
            return None
        return self.dense_ms / self.ms


def _weighted(layers, attr) -> float | None:
    rows = [(e.macs, getattr(e, attr)) for e in layers if e.macs and getattr(e, attr) is not None]
    total = sum(m for m, _ in rows)
    return sum(m * v for m, v in rows) / total if total else None


@dataclass
class ProfileReport:
    layers: list[LayerProfile] = field(default_factory=list)
    forward_ms: float = 0.0
    throughput_per_s: float = 0.0
    energy_j_per_forward: float | None = None
    device: str = "cpu"
    samples_per_s: float | None = None
    batch: int | None = None
    reps: int = 0
    e_mac_j: float = E_MAC_J
    e_ac_j: float = E_AC_J
    energy_source: str = "not measured"

    @property
    def total_macs(self) -> int:
        """Dense MACs per forward of every Conv/Linear layer."""
        return sum(e.macs or 0 for e in self.layers)

    @property
    def nonspiking_macs(self) -> int:
        """MACs per forward of the layers that are not spike-driven (the image stem, analog heads)."""
        return sum(e.macs or 0 for e in self.layers if e.macs and not e.spiking)

    @property
    def total_sops(self) -> int:
        return sum(e.sops or 0 for e in self.layers)

    @property
    def theoretical_energy_j(self) -> float:
        """``e_mac * nonspiking_macs + e_ac * total_sops`` per forward."""
        return theoretical_energy(self.nonspiking_macs, self.total_sops, self.e_mac_j, self.e_ac_j)

    def per_sample(self, value):
        return None if value is None or not self.batch else value / self.batch

    @property
    def skippable_work(self) -> float | None:
        """MAC-weighted fraction of the convolution/linear work in all-zero blocks."""
        return _weighted(self.layers, "skippable")

    @property
    def skipped_work(self) -> float | None:
        """MAC-weighted fraction of the convolution/linear work the chosen paths skipped."""
        return _weighted(self.layers, "skipped")

    def to_dict(self) -> dict:
        return {"device": self.device, "forward_ms": self.forward_ms, "throughput_per_s": self.throughput_per_s,
                "samples_per_s": self.samples_per_s, "batch": self.batch, "reps": self.reps,
                "energy_j_per_forward": self.energy_j_per_forward, "skippable_work": self.skippable_work,
                "skipped_work": self.skipped_work, "energy_source": self.energy_source,
                "energy_j_per_sample": self.per_sample(self.energy_j_per_forward),
                "total_macs": self.total_macs, "nonspiking_macs": self.nonspiking_macs, "total_sops": self.total_sops,
                "sops_per_sample": self.per_sample(self.total_sops), "e_mac_j": self.e_mac_j, "e_ac_j": self.e_ac_j,
                "theoretical_energy_j": self.theoretical_energy_j,
                "theoretical_energy_j_per_sample": self.per_sample(self.theoretical_energy_j),
                "layers": [dict(asdict(e), skippable=e.skippable, skipped=e.skipped, speedup=e.speedup,
                                spiking=e.spiking) for e in self.layers]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(CSV_COLUMNS)
        num = lambda v, f=".6g": "" if v is None else format(v, f)
        for e in self.layers:
            w.writerow([e.name, e.type, e.calls, "x".join(map(str, e.in_shape or [])), f"{e.ms:.6f}",
                        num(e.dense_ms, ".6f"), num(e.speedup, ".4f"), num(e.elem_density), num(e.block_size, "d"),
                        num(e.block_density), num(e.skippable), num(e.skipped), num(e.macs, "d"), e.path or "",
                        e.input_kind or "", num(e.sops, "d"), num(e.firing_rate), num(e.energy_j)])
        return buf.getvalue()

    def table(self) -> str:
        head = (f"{'layer':<28} {'type':<14} {'calls':>5} {'ms':>9} {'dense ms':>9} {'speed-up':>8} {'elem':>6} "
                f"{'bs':>3} {'blocks':>6} {'skip':>6} {'input':>6} {'SOPs':>9} {'fire':>5}  path")
        out = [head, "-" * len(head)]
        fmt = lambda v, f=".3f": "" if v is None else format(v, f)
        for e in self.layers:
            out.append(f"{e.name[-28:]:<28} {e.type[:14]:<14} {e.calls:>5} {e.ms:>9.4f} {fmt(e.dense_ms, '.4f'):>9} "
                       f"{fmt(e.speedup, '.2f') + ('x' if e.speedup is not None else ''):>8} "
                       f"{fmt(e.elem_density):>6} {fmt(e.block_size, 'd'):>3} {fmt(e.block_density):>6} "
                       f"{fmt(e.skipped):>6} {(e.input_kind or '')[:6]:>6} {fmt(e.sops, '.3g'):>9} "
                       f"{fmt(e.firing_rate, '.3f')[1:] if e.firing_rate is not None else '':>5}  {e.path or ''}")
        en = "" if self.energy_j_per_forward is None else f", {self.energy_j_per_forward:.3f} J/forward"
        sps = "" if self.samples_per_s is None else f", {self.samples_per_s:.1f} samples/s"
        out.append(f"forward {self.forward_ms:.3f} ms ({self.throughput_per_s:.1f} forwards/s{sps}) "
                   f"on {self.device}{en}")
        out.append(f"SOPs {self.total_sops:.4g} + non-spiking MACs {self.nonspiking_macs:.4g} (dense MACs "
                   f"{self.total_macs:.4g}) per forward: theoretical energy {self.theoretical_energy_j * 1e3:.4g} mJ "
                   f"(E_AC {self.e_ac_j * 1e12:g} pJ, E_MAC {self.e_mac_j * 1e12:g} pJ); measured: "
                   + (f"{self.energy_j_per_forward:.4g} J (NVML)" if self.energy_j_per_forward is not None
                      else self.energy_source))
        if self.skippable_work is not None:
            out.append(f"work in all-zero blocks {self.skippable_work:.1%} (MAC-weighted), skipped by the chosen "
                       f"paths {self.skipped_work:.1%}")
        if self.device == "cpu":
            out.append("CPU: no GPU timings (the kernels run interpreted under TRITON_INTERPRET=1, else the torch "
                       "ops); the densities and the layer list hold on any device")
        return "\n".join(out)

    def save(self, path: str) -> str:
        """Write the report to ``path``: JSON for .json, CSV for .csv, the terminal table otherwise."""
        ext = os.path.splitext(path)[1].lower()
        text = self.to_json(indent=1) if ext == ".json" else self.to_csv() if ext == ".csv" else self.table() + "\n"
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(path, "w", newline="") as f:
            f.write(text)
        return path

    def __str__(self) -> str:
        return self.table()
