"""The GPU suite (``pytest -m gpu``, run by scripts/gpu_check.sh on the device machine) reuses the test helpers of
the package suites: the property samplers of the kernel tests, the model zoo cases and small nets of the core tests.
Their folders go on the import path here, once. (The interpreter, seeds and ``strict_fp32`` come from the root
conftest.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("packages/sparseflow-kernels/tests", "packages/sparseflow-core/tests"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))
