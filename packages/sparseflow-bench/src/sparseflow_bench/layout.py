"""Where benchmark results live: one folder per GPU model under the results root.

    benchmarks/results/<device>/     e.g. benchmarks/results/h200/, benchmarks/results/h100/

``<device>`` is :func:`device_slug` of the GPU's name ("NVIDIA H200" -> ``h200``, "NVIDIA H100 80GB HBM3" ->
``h100``). A run writes into its GPU's folder and replaces the files it writes there; every JSON records the
device, versions and date (``_env``). The README's results block and the CPU demo read the folder with the
newest measurements (:func:`current_results_dir`).

``python -m sparseflow_bench.layout [ROOT]`` prints the folder of this machine's GPU (for scripts).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

RESULTS_ROOT = os.path.join("benchmarks", "results")


def device_slug(name: str) -> str:
    """A short folder name for a GPU: its model number (``h100``, ``h200``, ``a100``, ``l40s``, ``rtx4090``), else
    the lower-case name with every run of other characters turned into ``-``."""
    low = name.lower().replace("nvidia", " ").replace("geforce", " ")
    m = re.search(r"\brtx\s*(\d{4})\b", low)
    if m:
        return "rtx" + m.group(1)
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", low)
    if m:
        return m.group(1)
    slug = re.sub(r"[^a-z0-9]+", "-", low).strip("-")
    return slug or "unknown-device"


def device_results_dir(root: str = RESULTS_ROOT, device_name: str | None = None) -> str:
    """The results folder of ``device_name`` (default: this machine's first CUDA GPU) under ``root``."""
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return os.path.join(root, device_slug(device_name))


def result_envs(d: str) -> list[dict]:
    """The environment (``_env`` or ``env``: device, versions, date) of each readable JSON file of folder ``d``, in
    file-name order."""
    out = []
    for path in sorted(glob.glob(os.path.join(d, "*.json"))):
        try:
            with open(path) as f:
                obj = json.load(f)
        except (OSError, ValueError):
            continue
        env = (obj.get("_env") or obj.get("env")) if isinstance(obj, dict) else None
        if isinstance(env, dict):
            out.append(env)
    return out


def results_date(d: str) -> str:
    """The newest ``date`` recorded in the JSON files of folder ``d`` ('' when none)."""
    return max((e["date"] for e in result_envs(d) if isinstance(e.get("date"), str)), default="")


def device_dirs(root: str = RESULTS_ROOT) -> list[str]:
    """The device folders under ``root`` that hold results JSON, newest measurements first."""
    if not os.path.isdir(root):
        return []
    dirs = [os.path.join(root, n) for n in sorted(os.listdir(root))]
    dirs = [d for d in dirs if os.path.isdir(d) and glob.glob(os.path.join(d, "*.json"))]
    return sorted(dirs, key=results_date, reverse=True)


def current_results_dir(root: str = RESULTS_ROOT) -> str | None:
    """The device folder with the newest measurements under ``root`` (None when there is none)."""
    dirs = device_dirs(root)
    return dirs[0] if dirs else None


if __name__ == "__main__":
    print(device_results_dir(sys.argv[1] if len(sys.argv) > 1 else RESULTS_ROOT))
