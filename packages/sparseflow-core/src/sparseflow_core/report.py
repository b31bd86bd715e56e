"""The report ``optimize()`` returns: what was replaced, fused, folded or left alone, and why."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field

#: the table's width: longer details and reasons wrap onto continuation lines
TABLE_WIDTH = 120
#: the path cell of a replaced layer before the model's first call
PATH_PENDING = "after 1st call"

#: where ``optimize()`` keeps its report on the model (``get_report`` reads it)
REPORT_ATTR = "_sparseflow_report"


def user_type(m) -> str:
    """The name of the class the user wrote for ``m``: a SparseFlow drop-in (``SparseConv2d``, ``TritonMaxPool2d``,
    ...) reports the module it stands for (``Conv2d``, SpikingJelly's ``MaxPool2d``)."""
    d = getattr(m, "__dict__", {})
    if d.get("parametrizations") is not None or "parametrizations" in d.get("_modules", {}):
        return type(m).__bases__[0].__name__  # torch.nn.utils.parametrize's ParametrizedConv2d: the user's Conv2d
    if d.get("_original_class") is not None:
        return d["_original_class"].__name__
    if d.get("_original") is not None:
        return type(d["_original"]).__name__
    from sparseflow_ops import SparseModule

    if isinstance(m, SparseModule):
        base = next((k for k in type(m).__mro__[1:] if not issubclass(k, SparseModule)
                     and k.__module__.startswith(("torch", "spikingjelly", "snntorch"))), None)
        if base is not None:
            return base.__name__
    return type(m).__name__


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


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

    def table(self, width: int = TABLE_WIDTH) -> str:
        """One row per layer, in model order, no wider than ``width`` (longer details and reasons wrap onto
        continuation lines); then the counts and the notes (wrapped too)."""
        head = ("layer", "type", "action", "block", "elem", "blocks", "path", "detail; reason")
        pending = bool(self.replaced) and not any(e.path for e in self.layers)  # the model not called yet
        rows = []
        for e in self.layers:
            path = e.path or (PATH_PENDING if pending and e.action in ("fused", "sparse", "kernel") else "")
            text = "; ".join(t for t in (e.detail, f"why: {e.reason}" if e.reason else "") if t)
            rows.append((
                e.name, e.type, e.action, "" if e.block_size is None else str(e.block_size),
                "" if e.elem_density is None else f"{e.elem_density:.3f}",
                "" if e.block_density is None else f"{e.block_density:.3f}", path, text,
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head[:-1])]
        # the text column keeps at least 30 characters: long layer names wrap in their own column first
        widths[0] = max(len(head[0]), min(widths[0], width - 30 - sum(widths[1:]) - 3 * len(widths)))
        last = max(30, width - sum(widths) - 3 * len(widths))
        fmt = " | ".join(f"{{:<{w}}}" for w in widths) + " | {}"
        lines = [fmt.format(*head).rstrip(), "-+-".join("-" * w for w in [*widths, last])]
        for r in rows:
            parts = textwrap.wrap(r[-1], last, break_long_words=True, break_on_hyphens=False) or [""]
            names = [r[0][i:i + widths[0]] for i in range(0, len(r[0]), widths[0])] or [""]
            lines.append(fmt.format(names[0], *r[1:-1], parts[0]).rstrip())
            for i in range(1, max(len(parts), len(names))):
                lines.append(fmt.format(names[i] if i < len(names) else "", *([""] * (len(widths) - 1)),
                                        parts[i] if i < len(parts) else "").rstrip())
        counts = (f"{_plural(len(self.by_action('fused')), 'fused spiking layer')}, "
                  f"{_plural(len(self.by_action('sparse')), 'sparse layer')}, "
                  f"{_plural(len(self.by_action('kernel')), 'other layer')} on SparseFlow kernels, "
                  f"{_plural(len(self.by_action('neuron-kernel')), 'neuron')} on the kernel, "
                  f"{_plural(len(self.by_action('left')), 'layer')} left as "
                  f"{'it was' if len(self.by_action('left')) == 1 else 'they were'}; "
                  f"{_plural(len(self.folded), 'BatchNorm')} folded")
        notes = [f"note: {n}" for n in self.notes]
        if pending:
            notes.append("note: the path column (the kernel path each layer took on its last call) fills after "
                         "the model's first call: get_report(model) then")
        for text in (counts, *notes):
            lines += textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
