"""What the markdown tables and plots share: a results file loaded by name, the environment line, one figure."""

from __future__ import annotations

import json
import os


def load_json(d: str, name: str):
    """The JSON object of ``d/name``, or None when there is no such file."""
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def env_line(env: dict) -> str:
    return (f"{env.get('device', '?')}, torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
            f"CUDA {env.get('cuda', '?')}, driver {env.get('driver', '?')}, {env.get('date', '?')}")


def plot(d: str, fname: str, alt: str, draw, figsize) -> list[str]:
    """Draw one figure with ``draw(ax)``, save it as ``d/fname``; the markdown lines that show it (plots are
    optional: without matplotlib the table says why the plot is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=figsize)
        draw(ax)
        fig.tight_layout()
        fig.savefig(os.path.join(d, fname), dpi=120)
        plt.close(fig)
        return ["", f"![{alt}]({fname})"]
    except Exception as e:
        return ["", f"(plot skipped: {e})"]


def page(lines: list[str], d: str, fname: str, alt: str, draw, figsize) -> str:
    """``lines`` and the figure ``draw`` makes (saved as ``d/fname``) as one markdown page."""
    return "\n".join(lines + plot(d, fname, alt, draw, figsize)) + "\n"
