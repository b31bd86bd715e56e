"""Regression guard: ``sparseflow-bench compare NEW OLD [--threshold 0.05]``.

NEW and OLD are each a results folder, a long-format ``results.csv``, a ``pytest_benchmark.json`` or one
results JSON (see :mod:`sparseflow_bench.records`). Timings are matched by (file, section, model, layer, op,
shape, provider) (the file name is left out when each side holds a single file); a timing whose median grew
by more than ``threshold`` (5 % by default) is a slow-down. The table lists the slow-downs (``--all``: every
matched timing) and the exit status is 1 if there is any, 0 otherwise (2 when nothing could be matched).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .records import ROLES, Record, load


@dataclass
class Change:
    key: tuple
    name: str
    role: str
    old_ms: float
    new_ms: float

    @property
    def ratio(self) -> float:
        return self.new_ms / self.old_ms

    def slower(self, threshold: float) -> bool:
        return self.ratio > 1.0 + threshold


@dataclass
class Comparison:
    changes: list[Change]
    only_new: list[Record]
    only_old: list[Record]
    threshold: float
    devices: tuple[set, set]

    @property
    def slowdowns(self) -> list[Change]:
        return sorted((c for c in self.changes if c.slower(self.threshold)), key=lambda c: -c.ratio)

    @property
    def ok(self) -> bool:
        return not self.slowdowns

    def table(self, show_all: bool = False) -> str:
        rows = sorted(self.changes, key=lambda c: -c.ratio) if show_all else self.slowdowns
        lines = []
        new_dev, old_dev = self.devices
        if new_dev and old_dev and new_dev != old_dev:
            lines.append(f"WARNING: different devices (new {sorted(new_dev)}, old {sorted(old_dev)}): timings "
                         "compare only on the same device")
        if rows:
            w = max(len(c.name) for c in rows)
            lines.append(f"| {'timing':<{w}} | role | old ms | new ms | change | |")
            lines.append(f"|{'-' * (w + 2)}|---|---:|---:|---:|---|")
            for c in rows:
                flag = "SLOWER" if c.slower(self.threshold) else ""
                lines.append(f"| {c.name:<{w}} | {c.role} | {c.old_ms:.4f} | {c.new_ms:.4f} | "
                             f"{c.ratio - 1:+.1%} | {flag} |")
        n = len(self.slowdowns)
        faster = sum(c.ratio < 1.0 - self.threshold for c in self.changes)
        lines.append(f"{len(self.changes)} timings matched: {n} slower by more than {self.threshold:.0%}, "
                     f"{faster} faster by more than {self.threshold:.0%}; {len(self.only_new)} only in the new "
                     f"results, {len(self.only_old)} only in the old")
        lines.append("FAIL: slow-downs above the threshold" if n else "OK: no slow-down above the threshold")
        return "\n".join(lines)


def compare_records(new: list[Record], old: list[Record], threshold: float = 0.05,
                    roles: tuple[str, ...] | None = None) -> Comparison:
    """Match ``new`` to ``old`` records and measure each median's change (``roles``: only these roles)."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if roles is not None:
        bad = set(roles) - set(ROLES)
        if bad:
            raise ValueError(f"unknown roles {sorted(bad)} (known: {', '.join(ROLES)})")
        new = [r for r in new if r.role in roles]
        old = [r for r in old if r.role in roles]
    single = len({r.source for r in new}) <= 1 and len({r.source for r in old}) <= 1
    key = (lambda r: r.key) if single else (lambda r: (r.source, *r.key))
    old_by = {}
    for r in old:
        old_by.setdefault(key(r), r)
    new_by = {}
    for r in new:
        new_by.setdefault(key(r), r)
    changes = [Change(k, (f"{r.source}::" if not single else "") + r.name, r.role, old_by[k].median_ms, r.median_ms)
               for k, r in new_by.items() if k in old_by and old_by[k].median_ms > 0]
    return Comparison(changes, [r for k, r in new_by.items() if k not in old_by],
                      [r for k, r in old_by.items() if k not in new_by], threshold,
                      ({r.device for r in new if r.device}, {r.device for r in old if r.device}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sparseflow-bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("new", help="new results: folder, results.csv, pytest_benchmark.json or one results JSON")
    p.add_argument("old", help="old (committed) results, same kinds")
    p.add_argument("--threshold", type=float, default=0.05, help="largest allowed slow-down (default 0.05 = 5%%)")
    p.add_argument("--roles", default=None, help=f"only these roles, comma-separated ({', '.join(ROLES)}); "
                   "default all")
    p.add_argument("--all", action="store_true", help="list every matched timing, not only the slow-downs")
    a = p.parse_args(argv)
    quiet = lambda *_: None
    new, old = load(a.new, quiet), load(a.old, quiet)
    roles = tuple(a.roles.split(",")) if a.roles else None
    try:
        cmp = compare_records(new, old, a.threshold, roles)
    except ValueError as e:
        p.error(str(e))
    print(cmp.table(a.all))
    if not cmp.changes:
        print(f"nothing to compare: no timing of {a.new} ({len(new)} records) matches one of {a.old} "
              f"({len(old)} records)")
        return 2
    return 0 if cmp.ok else 1


if __name__ == "__main__":
    sys.exit(main())
