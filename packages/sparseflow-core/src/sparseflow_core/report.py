"""The report ``optimize()`` returns: what was replaced, fused, folded or left alone, and why."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerEntry:
    name: str
    type: str
    action: str  # "fused", "sparse", "kernel" (SparseFlow kernel, nothing skipped), "neuron-kernel", "left"
    detail: str = ""
    block_size: object = None
    reason: str = ""
    in_shape: tuple | None = None
    elem_density: float | None = None
    block_density: float | None = None
    path: str | None = None  # the kernel path the last call took (filled by refresh)


@dataclass
class OptimizeReport:
    layers: list[LayerEntry] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)  # (batchnorm, into conv)
    notes: list[str] = field(default_factory=list)

    def add(self, entry: LayerEntry) -> None:
        self.layers.append(entry)

    def by_action(self, action: str) -> list[LayerEntry]:
        return [e for e in self.layers if e.action == action]

    @property
    def replaced(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.action in ("fused", "sparse", "kernel")]

    @property
    def skipped(self) -> list[LayerEntry]:
        return [e for e in self.layers if e.action == "left"]

    def refresh(self, model) -> OptimizeReport:
        """Fill in the kernel path each replaced layer took on its last call."""
        mods = dict(model.named_modules())
        for e in self.layers:
            m = mods.get(e.name)
            if m is not None and hasattr(m, "last_path"):
                e.path = m.last_path
        return self

    def to_dict(self) -> dict:
        return {"layers": [asdict(e) for e in self.layers], "folded": [list(f) for f in self.folded],
                "notes": list(self.notes)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def table(self) -> str:
        head = ("layer", "type", "action", "detail", "block", "elem", "blocks", "path", "reason")
        rows = []
        for e in self.layers:
            rows.append((
                e.name, e.type, e.action, e.detail, "" if e.block_size is None else str(e.block_size),
                "" if e.elem_density is None else f"{e.elem_density:.3f}",
                "" if e.block_density is None else f"{e.block_density:.3f}",
                e.path or "", e.reason,
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
        lines += [fmt.format(*r) for r in rows]
        n_f, n_s, n_k, n_n, n_l = (len(self.by_action(a)) for a in ("fused", "sparse", "kernel", "neuron-kernel",
                                                                     "left"))
        lines.append(f"{n_f} fused spiking layers, {n_s} sparse layers, {n_k} other layers on SparseFlow kernels, "
                     f"{n_n} neurons on the kernel, {n_l} layers left as they were; "
                     f"{len(self.folded)} BatchNorms folded")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
