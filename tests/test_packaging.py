"""Packaging and layering rules of the monorepo.

Layers, bottom to top:

    sparseflow-kernels  ->  sparseflow-ops  ->  sparseflow-core  ->  sparseflow-bench

and the meta-package ``sparseflow`` (root pyproject, ``src/sparseflow``) on top of core.
A package may depend on (and import) the layers below it only, with a ``>=0.1,<0.2``
range on our own packages.

These tests read files only: they need neither torch nor the packages installed.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# (distribution name, import name, project dir), bottom layer first.
LAYERS = [
    ("sparseflow-kernels", "sparseflow_kernels", ROOT / "packages" / "sparseflow-kernels"),
    ("sparseflow-ops", "sparseflow_ops", ROOT / "packages" / "sparseflow-ops"),
    ("sparseflow-core", "sparseflow_core", ROOT / "packages" / "sparseflow-core"),
    ("sparseflow-bench", "sparseflow_bench", ROOT / "packages" / "sparseflow-bench"),
]
LAYER_INDEX = {dist: i for i, (dist, _, _) in enumerate(LAYERS)}
IMPORT_LAYER = {imp: i for i, (_, imp, _) in enumerate(LAYERS)}
META = ("sparseflow", "sparseflow", ROOT)

RANGE = SpecifierSet(">=0.1,<0.2")


def _pyproject(project_dir: Path) -> dict:
    path = project_dir / "pyproject.toml"
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    with path.open("rb") as f:
        return tomllib.load(f)


def _all_requirements(project: dict) -> list[tuple[str, Requirement]]:
    """(where, requirement) for dependencies and every optional-dependency group."""
    out = [("dependencies", Requirement(r)) for r in project.get("dependencies", [])]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    return out


def _ours(req: Requirement) -> bool:
    return req.name.lower().replace("_", "-") in {*LAYER_INDEX, "sparseflow"}


# --------------------------------------------------------------------------- (a) pyprojects


@pytest.mark.parametrize("dist,_imp,project_dir", [*LAYERS, META], ids=[d for d, _, _ in [*LAYERS, META]])
def test_pyproject_declares_name_and_version(dist: str, _imp: str, project_dir: Path) -> None:
    project = _pyproject(project_dir)["project"]
    assert project.get("name") == dist
    assert "version" in project, f"{dist}: [project].version is not set (dynamic versions are not used here)"
    version = Version(project["version"])
    assert version in RANGE, f"{dist} {version} is outside the {RANGE} series the layers pin to each other"


@pytest.mark.parametrize("dist,_imp,project_dir", LAYERS, ids=[d for d, _, _ in LAYERS])
def test_layer_depends_on_layer_below_only(dist: str, _imp: str, project_dir: Path) -> None:
    project = _pyproject(project_dir)["project"]
    level = LAYER_INDEX[dist]
    reqs = _all_requirements(project)
    ours = [(where, r) for where, r in reqs if _ours(r)]

    for where, req in ours:
        name = req.name.lower().replace("_", "-")
        assert name != "sparseflow", f"{dist} must not depend on the meta-package ({where}: {req})"
        assert LAYER_INDEX[name] < level, f"{dist} depends on a higher or equal layer ({where}: {req})"
        assert req.specifier == RANGE, f"{dist}: {where}: {req} should pin {name}{RANGE}"

    if level > 0:
        below = LAYERS[level - 1][0]
        direct = [r for where, r in ours if where == "dependencies"]
        assert any(r.name == below for r in direct), f"{dist} does not depend on {below}{RANGE}"
    else:
        assert not ours, f"{dist} is the bottom layer; it depends on {[str(r) for _, r in ours]}"
        names = {r.name.lower() for where, r in reqs if where == "dependencies"}
        # numpy: Triton's CPU interpreter (TRITON_INTERPRET=1) imports it
        allowed = {"torch", "triton", "numpy"}
        assert names <= allowed, f"{dist} should depend on torch, triton and numpy only, not {names}"


def test_meta_package_depends_on_core() -> None:
    project = _pyproject(ROOT)["project"]
    direct = [r for r in map(Requirement, project.get("dependencies", [])) if _ours(r)]
    assert any(r.name == "sparseflow-core" and r.specifier == RANGE for r in direct), (
        f"the sparseflow meta-package should depend on sparseflow-core{RANGE}, has {[str(r) for r in direct]}"
    )
    for where, req in _all_requirements(project):
        if _ours(req):
            assert req.specifier == RANGE, f"sparseflow: {where}: {req} should pin {RANGE}"


@pytest.mark.parametrize("dist,imp,project_dir", [*LAYERS, META], ids=[d for d, _, _ in [*LAYERS, META]])
def test_dunder_version_matches_pyproject(dist: str, imp: str, project_dir: Path) -> None:
    """Where a package's __init__.py spells out __version__, it equals the pyproject version."""
    init = project_dir / "src" / imp / "__init__.py"
    if not init.is_file():
        pytest.skip(f"{init.relative_to(ROOT)} does not exist yet")
    m = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init.read_text(encoding="utf-8"), re.M)
    if m is None:
        if dist == "sparseflow":
            pytest.fail("src/sparseflow/__init__.py must define __version__")
        pytest.skip(f"{imp} does not define __version__ literally")
    assert m.group(1) == _pyproject(project_dir)["project"]["version"]


# --------------------------------------------------------------------------- (b) imports: layering, enforced
# (the rules: test_imports_respect_layers_and_privacy's docstring)

# import name of a distribution where it is not the distribution name with "-" -> "_"
IMPORT_NAMES = {"scikit-image": "skimage", "pillow": "PIL", "pyyaml": "yaml", "nvidia-ml-py": "pynvml"}
# installed by `nox -s tests` (THIRD_PARTY in noxfile.py); packaging and tomli come with pytest
TEST_TOOLS = {"pytest", "hypothesis", "numpy", "pytest_benchmark", "packaging", "tomli"}
REFERENCE_LIBS = {"spikingjelly", "snntorch"}

# Known violations in src (file relative to the repository root, imported top-level module or private name),
# accepted until the packages declare or drop them. Empty it as they are fixed: a stale entry fails the test.
KNOWN_SRC_VIOLATIONS: set[tuple[str, str]] = set()

PACKAGES = [*LAYERS, META]


def _dist_import_name(dist: str) -> str:
    dist = dist.lower().replace("_", "-")
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def _installed_with(dist: str) -> set[str]:
    """Import names installing ``dist`` with all its extras installs: its own and, recursively, those of our
    packages it depends on."""
    names = {_dist_import_name(dist)}
    project_dir = next(d for name, _, d in PACKAGES if name == dist)
    for _, req in _all_requirements(_pyproject(project_dir)["project"]):
        name = req.name.lower().replace("_", "-")
        names |= _installed_with(name) if _ours(req) else {_dist_import_name(name)}
    return names


def _first_string(node: ast.expr) -> str | None:
    """The module named by a literal (or the literal head of an f-string) argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        head = str(node.values[0].value)
        return head.rsplit(".", 1)[0] if "." in head else None
    return None


def imports_of(text: str) -> list[tuple[int, str, str | None, bool]]:
    """(line, module, imported name or None, optional) for every absolute import in ``text``."""
    found: list[tuple[int, str, str | None, bool]] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module, a.name, False) for a in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if fname in ("import_module", "__import__", "importorskip"):
                module = _first_string(node.args[0])
                if module and not module.startswith("."):
                    found.append((node.lineno, module, None, fname == "importorskip"))
    return found


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def private_attributes(text: str, packages: set[str]) -> list[tuple[int, str]]:
    """(line, "module.name._private") for every ``alias._private`` where ``alias`` is bound by an import from one
    of ``packages``."""
    tree = ast.parse(text)
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                          for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            bound.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    bound = {k: v for k, v in bound.items() if v.split(".")[0] in packages}
    return [(n.lineno, f"{bound[n.value.id]}.{n.attr}") for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id in bound and _private(n.attr)]


def _test_modules(project_dir: Path) -> set[str]:
    dirs = [project_dir / "tests"] + ([d / "tests" for _, _, d in LAYERS] if project_dir == ROOT else [])
    return {p.stem for d in dirs for p in d.rglob("*.py")}


def layering_violations(dist: str, imp: str, project_dir: Path) -> list[tuple[str, str, str]]:
    """(file:line, offending module or name, why) for the two rules of test_imports_respect_layers_and_privacy."""
    ours = {i for _, i, _ in PACKAGES}
    installed = _installed_with(dist) | set(sys.stdlib_module_names) | {"__future__"}
    for_tests = installed | TEST_TOOLS | REFERENCE_LIBS | _test_modules(project_dir)
    files = [(p, False) for p in sorted((project_dir / "src" / imp).rglob("*.py"))]
    files += [(p, True) for p in sorted((project_dir / "tests").rglob("*.py"))]
    out = []
    for path, is_test in files:
        rel = str(path.relative_to(ROOT))
        text = path.read_text(encoding="utf-8")
        for line, used in private_attributes(text, ours - {imp}):
            out.append((f"{rel}:{line}", used, f"uses {used}, private to {used.split('.')[0]}"))
        for line, module, name, optional in imports_of(text):
            top = module.split(".")[0]
            where = f"{rel}:{line}"
            if top not in (for_tests if is_test else installed) and not (optional and top not in ours):
                out.append((where, top, f"imports {top}, which {dist} does not depend on"))
            parts = (module if name is None else f"{module}.{name}").split(".")
            first = next((i for i, part in enumerate(parts) if i and _private(part)), None)
            if top in ours and top != imp and first is not None:
                private = ".".join(parts[: first + 1])
                out.append((where, private, f"imports {private}, private to {top}"))
    line_order = lambda v: (v[0].rsplit(":", 1)[0], int(v[0].rsplit(":", 1)[1]))
    return sorted(dict.fromkeys(out), key=line_order)  # (one line per `from x import a, b`)


def test_import_parser_sanity() -> None:
    text = (
        "import os, sparseflow_core.x as y\n"
        "def f():\n"
        "    from sparseflow_bench.cli import _main\n"
        "from . import sibling\n"
        "x = importlib.import_module('sparseflow_ops._common')\n"
        "m = importlib.import_module(f'spikingjelly.activation_based.model.{name}')\n"
        "np = pytest.importorskip('numpy')\n"
    )
    assert imports_of(text) == [
        (1, "os", None, False), (1, "sparseflow_core.x", None, False), (3, "sparseflow_bench.cli", "_main", False),
        (5, "sparseflow_ops._common", None, False), (6, "spikingjelly.activation_based.model", None, False),
        (7, "numpy", None, True),
    ]
    text = "import sparseflow_kernels.dispatch as kd\nfrom sparseflow_ops import neurons\nkd._CACHE, neurons._X, kd.ok"
    assert private_attributes(text, {"sparseflow_kernels", "sparseflow_ops"}) == [
        (3, "sparseflow_kernels.dispatch._CACHE"), (3, "sparseflow_ops.neurons._X")]


def test_installed_with_follows_our_dependencies() -> None:
    assert {"sparseflow_kernels", "torch", "triton", "numpy"} == _installed_with("sparseflow-kernels")
    assert {"sparseflow_core", "sparseflow_ops", "sparseflow_kernels", "triton"} <= _installed_with("sparseflow-core")
    assert "sparseflow_bench" not in _installed_with("sparseflow-core")
    assert {"sparseflow_bench", "skimage"} <= _installed_with("sparseflow")


def test_nox_tests_session_installs_the_test_tools() -> None:
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    third_party = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                       and any(getattr(t, "id", None) == "THIRD_PARTY" for t in n.targets))
    installed = {_dist_import_name(Requirement(r).name) for r in third_party}
    assert (TEST_TOOLS | REFERENCE_LIBS) - {"packaging", "tomli"} <= installed, sorted(installed)


@pytest.mark.parametrize("dist,imp,project_dir", PACKAGES, ids=[d for d, _, _ in PACKAGES])
def test_imports_respect_layers_and_privacy(dist: str, imp: str, project_dir: Path) -> None:
    """Every .py file of the package's src and tests, parsed with ``ast`` (function-local imports,
    ``importlib.import_module("x")``, ``__import__("x")`` and ``pytest.importorskip("x")`` count; relative imports
    stay inside the package), keeps two rules; every violation is listed as file:line.

    1. A package imports only what installing it installs: its own ``dependencies`` and ``optional-dependencies``
       and, through each of our packages it depends on, theirs (sparseflow-core may import sparseflow_kernels,
       which sparseflow-ops brings; the meta-package's ``bench`` extra brings every layer). Its tests may import the
       same, plus its own test modules (the files of its tests folder; the root tests may also use those of any
       package), the test tools ``nox -s tests`` installs (TEST_TOOLS, checked against the noxfile) and the
       reference libraries whose neurons and models the results are compared with (SpikingJelly, snnTorch). A
       third-party library a test only ``pytest.importorskip``s is optional: the test is skipped without it.
    2. No package imports another package's private (``_name``) module or name, or reads one as an attribute of a
       module it imported (``dispatch._CACHE``), in src or tests; a package's own tests may use its own private
       names.

    Known src violations are listed in KNOWN_SRC_VIOLATIONS until fixed; an entry that no longer matches fails."""
    found = layering_violations(dist, imp, project_dir)
    new = [f"{w}: {why}" for w, what, why in found if (w.rsplit(":", 1)[0], what) not in KNOWN_SRC_VIOLATIONS]
    mine = {k for k in KNOWN_SRC_VIOLATIONS if (ROOT / k[0]).is_relative_to(project_dir / "src" / imp)}
    stale = mine - {(w.rsplit(":", 1)[0], what) for w, what, _ in found}
    assert not new, f"{dist}: imports across the layers:\n" + "\n".join(new)
    assert not stale, f"{dist}: fixed, remove from KNOWN_SRC_VIOLATIONS: {sorted(stale)}"


# --------------------------------------------------------------------------- (c) CI runs the README's command

_FENCE_RE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1\s*$", re.M | re.S)
_NOX_TESTS_RE = re.compile(r"\bnox\b[^\n`;&|#]*?-s\s+tests\b[^\n`;&|#]*")


def test_ci_runs_the_readme_test_command() -> None:
    readme = ROOT / "README.md"
    assert readme.is_file(), (
        "README.md is missing at the repo root: it should show the test command "
        "(a fenced code block with `nox -s tests`) that .ci/run runs"
    )
    blocks = [m.group(2) for m in _FENCE_RE.finditer(readme.read_text(encoding="utf-8"))]
    commands = sorted({m.group(0).strip() for b in blocks for m in _NOX_TESTS_RE.finditer(b)})
    assert commands, "README.md has no fenced code block with the test command `nox -s tests`"

    ci = ROOT / ".ci" / "run"
    assert ci.is_file(), "missing .ci/run"
    ci_text = ci.read_text(encoding="utf-8")
    ci_lines = [ln for ln in ci_text.splitlines() if not ln.lstrip().startswith("#")]
    for cmd in commands:
        assert any(cmd in ln for ln in ci_lines), f".ci/run does not run the README's test command {cmd!r}"


# --------------------------------------------------------------------------- the meta-package

META_EXPORTS = [
    "optimize", "restore", "profile", "register_spiking_module", "OptimizeReport", "get_report", "cuda_graph",
    "analyze", "export", "force_path",
]


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_meta_package_imports_lazily() -> None:
    """`import sparseflow` must not import sparseflow_core (or torch) until a name is used."""
    proc = _run_python(
        "import sys, sparseflow\n"
        "assert 'sparseflow_core' not in sys.modules, 'sparseflow_core imported eagerly'\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
        f"expected = sorted({[*META_EXPORTS, '__version__']!r})\n"
        "assert sorted(sparseflow.__all__) == expected, sparseflow.__all__\n"
        "try:\n"
        "    sparseflow.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise AssertionError('unknown name did not raise AttributeError')\n"
        "assert 'sparseflow_core' not in sys.modules\n"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_meta_package_reexports_core_api() -> None:
    sparseflow_core = pytest.importorskip("sparseflow_core")
    sparseflow = pytest.importorskip("sparseflow")

    missing = [n for n in META_EXPORTS if not hasattr(sparseflow_core, n)]
    assert not missing, f"sparseflow_core does not define {missing}, which sparseflow re-exports"
    for name in META_EXPORTS:
        assert getattr(sparseflow, name) is getattr(sparseflow_core, name)


# --------------------------------------------------------------------------- installing from a checkout


def _readme_blocks() -> list[str]:
    return [m.group(2) for m in _FENCE_RE.finditer((ROOT / "README.md").read_text(encoding="utf-8"))]


def test_kernels_declare_what_the_interpreter_needs() -> None:
    """Triton's CPU interpreter (TRITON_INTERPRET=1) imports numpy: the kernels wheel alone must bring it."""
    deps = {Requirement(r).name for r in _pyproject(LAYERS[0][2])["project"]["dependencies"]}
    assert {"torch", "triton", "numpy"} <= deps, deps


def test_readme_install_commands_name_real_packages_in_layer_order() -> None:
    """The README's install section says the packages are not on an index and installs from the checkout: one
    command for everything (every package below the meta-package, then the root), one for the kernels alone."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "not on a package index" in text
    installs = [ln.split("#")[0].split() for b in _readme_blocks() for ln in b.splitlines()
                if ln.strip().startswith("pip install ./")]
    assert installs, "README.md shows no `pip install ./...` command"
    for cmd in installs:
        for path in cmd[2:]:
            assert (ROOT / path / "pyproject.toml").is_file(), f"README installs {path}, which is no package"
    everything = max(installs, key=len)[2:]
    layers = [f"./packages/{d}" for d, _, _ in LAYERS if d != "sparseflow-bench"]
    assert everything == [*layers, "."], everything
    assert ["pip", "install", "./packages/sparseflow-kernels"] in installs


def test_nox_build_runs_a_kernel_under_the_interpreter() -> None:
    """`nox -s build` installs the kernels wheel alone and runs a kernel through the interpreter against torch."""
    nox_text = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    smoke = nox_text[nox_text.index("SMOKE_KERNELS = "):nox_text.index("SMOKE_ALL = ")]
    assert "sparse_conv2d(" in smoke and "conv2d(" in smoke.replace("sparse_conv2d(", "") and "assert" in smoke
    assert 'session.run(py, "-c", SMOKE_KERNELS, external=True, env={"TRITON_INTERPRET": "1"})' in nox_text


# --------------------------------------------------------------------------- results and docs


def _tracked(path: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", path], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is None or out.returncode != 0:
        return [str(p.relative_to(ROOT)) for p in (ROOT / path).rglob("*") if p.is_file()]
    return out.stdout.split()


def test_results_hold_no_logs_and_one_folder_per_device() -> None:
    files = _tracked("benchmarks/results")
    assert "benchmarks/results/README.md" in files
    bad = [f for f in files if f.endswith((".log", ".xml")) or "/logs/" in f or f.endswith("pytest_benchmark.json")]
    assert not bad, f"logs / junit / pytest-benchmark files are not results: {bad}"
    loose = [f for f in files if f.count("/") == 2 and f != "benchmarks/results/README.md"]
    assert not loose, f"results belong in a device folder (benchmarks/results/<device>/): {loose}"


# words of how the code was made, not of what it is: numbered runs and issues, milestone labels (spelled with
# character classes so that this line does not match itself)
_DEV_WORDS = re.compile(r"\bsess[i]ons?\b|\brun \d|\bruns? \d+-\d|\biss[u]es? \d|\bp[2]\b", re.I)


@pytest.mark.parametrize("path", ["README.md", "docs", "benchmarks/results"])
def test_docs_and_results_speak_of_the_product(path: str) -> None:
    """Docs, the README and result files describe SparseFlow and its measurements, not how it was developed (a line
    that names nox may speak of its sessions)."""
    hits = []
    for f in _tracked(path):
        if not f.endswith((".md", ".json", ".csv", ".txt")):
            continue
        for i, line in enumerate((ROOT / f).read_text(encoding="utf-8").splitlines(), 1):
            for m in _DEV_WORDS.finditer(line):
                if "nox" not in line.lower():
                    hits.append(f"{f}:{i}: {m.group(0)!r}")
        if _DEV_WORDS.search(Path(f).name.replace("_", " ")):
            hits.append(f"{f}: file name")
    assert not hits, "\n".join(hits[:20])
