"""Nox sessions for the SparseFlow monorepo.

    nox -l              list the sessions
    nox                 lint + tests (the defaults, what CI runs through .ci/run)
    nox -s tests        CPU test suite under Triton's interpreter (TRITON_INTERPRET=1)
    nox -s lint         ruff check
    nox -s build        build the five wheels into dist/, install them into a fresh venv (the kernels wheel first,
                        alone) and run a kernel under Triton's interpreter against torch
    nox -s bench        GPU benchmarks + report into benchmarks/results/<device>/; the CPU demo without a GPU
    nox -s gpu          scripts/gpu_check.sh (only meaningful on the GPU device machine)

Installing torch into a venv takes minutes (the pinned build is large), so only the
sessions that need it install it (tests, bench, and the fresh venv inside build), and
tests/bench reuse their venvs from one run to the next (``reuse_venv=True``): a second
run only re-checks the pins and re-installs our own packages.

torch/torchvision are pinned to the releases this machine's pip cap allows
(/etc/xdg/pip: torch<=2.14.1, torchvision<=0.29.1); pip on Python 3.11 takes them from
local disk instead of downloading a CUDA build.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]

ROOT = Path(__file__).resolve().parent

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# Smallest torch pin for venvs that only need torch itself (no torchvision).
TORCH_ONLY = ["torch==2.14.1"]

# Layer order matters: each package depends on the one before it; the root
# meta-package (".") comes last.
PACKAGES = [
    "packages/sparseflow-kernels",
    "packages/sparseflow-ops",
    "packages/sparseflow-core",
    "packages/sparseflow-bench",
    ".",
]
IMPORT_NAMES = ["sparseflow_kernels", "sparseflow_ops", "sparseflow_core", "sparseflow_bench", "sparseflow"]

# Third-party dependencies of our packages (and of their tests), installed before our
# own packages go in with --no-deps.
THIRD_PARTY = [
    "triton",
    "spikingjelly",
    "snntorch",
    "scikit-image",
    "numpy",
    "pytest",
    "pytest-xdist",
    "hypothesis",
    "pytest-benchmark",
    "matplotlib",
    "tqdm",
]
# Needed to install our hatchling projects in editable mode without build isolation
# (saves one throwaway build env per package).
BUILD_BACKEND = ["hatchling>=1.18", "editables"]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def install_sparseflow(session: nox.Session) -> None:
    """Install torch, the third-party deps, then our five packages (editable, --no-deps)."""
    session.install(*TORCH)
    # torch is pinned again so that nothing in the next resolve can move it.
    session.install(*TORCH, *THIRD_PARTY, *BUILD_BACKEND)
    editable: list[str] = []
    for pkg in PACKAGES:
        editable += ["-e", pkg]
    session.install("--no-deps", "--no-build-isolation", *editable)


@nox.session(venv_backend="venv")
def lint(session: nox.Session) -> None:
    """ruff check over the whole repo (config in the root pyproject.toml)."""
    session.install("ruff==0.17.6")  # pinned: a new ruff release must not turn CI red on its own
    session.run("ruff", "check", ".", *session.posargs)


@nox.session(venv_backend="venv", reuse_venv=True)
def tests(session: nox.Session) -> None:
    """CPU test suite: pytest -m "not gpu" with TRITON_INTERPRET=1.

    Extra arguments go to pytest: ``nox -s tests -- -k occupancy -x``.
    Pass ``-n 0`` (or ``-p no:xdist``) to run without pytest-xdist.
    """
    install_sparseflow(session)
    session.env["TRITON_INTERPRET"] = "1"
    args = ["-m", "not gpu"]
    posargs = list(session.posargs)
    wants_own_workers = any(a.startswith(("-n", "--numprocesses")) or a.endswith("no:xdist") for a in posargs)
    workers = _cpu_count()
    if workers > 1 and not wants_own_workers:
        args += ["-n", str(workers)]
    session.run("python", "-m", "pytest", *args, *posargs)


@nox.session(venv_backend="venv", reuse_venv=True)
def bench(session: nox.Session) -> None:
    """Benchmarks and their report: ``sparseflow-bench --results-root benchmarks/results --readme README.md``.

    With a CUDA GPU, in one call: the per-op density sweep on synthetic spikes (i.i.d., clustered, silent
    channels), the end-to-end models against eager fp32 and ``torch.compile``, ``sparseflow.profile`` of every
    benchmark model (per-layer latency against each layer's dense op), each against its dense baseline in the same
    run (``--sections`` adds the other sections of ``sparseflow_bench.sections``), then the report
    into ``benchmarks/results/<device>/`` (``sparseflow_bench.layout``): ``results.csv`` (long format), markdown
    tables, PNG plots, and the README's Results block. Without one the CLI runs the CPU demo: SparseFlow's kernels
    through Triton's interpreter on a small spiking CNN (a minute or two; it writes no files). Extra arguments go
    to the CLI: ``nox -s bench -- --sections layers,e2e --T 4 --batch 8``; ``nox -s bench -- compare NEW OLD``
    runs the regression guard instead, ``nox -s bench -- diagnose MODEL`` where an optimized model departs from the
    dense one. On a machine whose python already has every dependency (the GPU device machine:
    ``GPU_BENCH=nox bash scripts/gpu_check.sh``), ``nox --no-venv --no-install -s bench`` runs it in that python.
    """
    install_sparseflow(session)
    # ``nox --no-venv --no-install -s bench`` (a machine whose python already has torch, triton and the
    # dependencies, e.g. the GPU device machine; our packages on PYTHONPATH): the python running nox
    python = sys.executable if session.venv_backend == "none" else "python"
    if session.posargs and session.posargs[0] in ("report", "compare", "run", "diagnose"):
        session.run(python, "-m", "sparseflow_bench.cli", *session.posargs, external=True)
        return
    session.run(python, "-m", "sparseflow_bench.cli", "--results-root", str(ROOT / "benchmarks" / "results"),
                "--readme", str(ROOT / "README.md"), *session.posargs, external=True)


# triton and numpy are not installed explicitly: they must come in as dependencies of the kernels wheel. The check
# runs one kernel through Triton's CPU interpreter (TRITON_INTERPRET=1, set by the session) on spikes with
# all-zero blocks and compares it with torch's conv2d.
SMOKE_KERNELS = """
import torch, triton, sparseflow_kernels
from sparseflow_kernels import sparse_conv2d
g = torch.Generator().manual_seed(0)
x = (torch.rand(2, 16, 12, 12, generator=g) < 0.2).float()
x[:, :, :6] = 0  # all-zero blocks to skip
w, b = torch.randn(8, 16, 3, 3, generator=g), torch.randn(8, generator=g)
y = sparse_conv2d(x, w, b, padding=1, block_size=4)
err = float((y - torch.nn.functional.conv2d(x, w, b, padding=1)).abs().max())
assert err < 1e-4, f"sparse_conv2d differs from torch's conv2d by {err}"
print('sparseflow_kernels', sparseflow_kernels.__file__, '| torch', torch.__version__, '| triton', triton.__version__,
      f'| sparse_conv2d under the interpreter: max |kernel - torch| = {err:.2g}')
"""
SMOKE_ALL = (
    "import sparseflow_kernels, sparseflow_ops, sparseflow_core, sparseflow_bench, sparseflow; "
    "print('sparseflow', sparseflow.__version__)"
)


@nox.session(venv_backend="venv", reuse_venv=True)
def build(session: nox.Session) -> None:
    """Build the five wheels into dist/, then install them into a fresh venv.

    The fresh venv first gets sparseflow-kernels alone (with its own dependencies: torch, triton, numpy) and runs
    one of its kernels under Triton's interpreter against torch, then the four other wheels, and imports
    everything.
    """
    session.install("build")
    dist = ROOT / "dist"
    dist.mkdir(exist_ok=True)
    for old in dist.glob("sparseflow*.whl"):
        old.unlink()

    wheels: dict[str, Path] = {}
    for pkg, name in zip(PACKAGES, IMPORT_NAMES):
        before = set(dist.glob("*.whl"))
        session.run("python", "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT / pkg))
        new = sorted(set(dist.glob("*.whl")) - before)
        if len(new) != 1:
            session.error(f"expected one new wheel from {pkg}, got {[p.name for p in new]}")
        wheels[name] = new[0]
    session.log("built: " + ", ".join(p.name for p in wheels.values()))

    venv_dir = Path(session.create_tmp()).resolve() / "smoke-venv"
    if venv_dir.exists():
        shutil.rmtree(venv_dir)
    session.run("python", "-m", "venv", str(venv_dir))
    py = str(venv_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]

    # Run the imports from outside the repo so nothing can come from the source trees.
    with session.chdir(venv_dir):
        # 1. sparseflow-kernels alone: only torch + triton come with it.
        session.run(*pip, *TORCH_ONLY, str(wheels["sparseflow_kernels"]), external=True)
        session.run(py, "-c", SMOKE_KERNELS, external=True, env={"TRITON_INTERPRET": "1"})
        # 2. the rest, with their third-party deps resolved from the wheels' metadata.
        rest = [str(wheels[n]) for n in IMPORT_NAMES if n != "sparseflow_kernels"]
        session.run(*pip, *TORCH_ONLY, *rest, external=True)
        session.run(py, "-c", SMOKE_ALL, external=True)
        script = venv_dir / "bin" / "sparseflow-bench"
        if not script.exists():
            session.error(f"console script {script.name} was not installed")
        session.run(py, "-m", "pip", "check", external=True)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """Run scripts/gpu_check.sh: GPU tests + GPU benchmarks.

    Only meaningful on the GPU device machine, which runs the script directly
    (``bash scripts/gpu_check.sh [args for sparseflow_bench.gpu_run]``); it uses that
    machine's python3 and puts the source trees on PYTHONPATH instead of installing.
    """
    session.run("bash", str(ROOT / "scripts" / "gpu_check.sh"), *session.posargs, external=True)
