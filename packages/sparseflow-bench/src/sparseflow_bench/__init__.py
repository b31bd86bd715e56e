"""SparseFlow benchmarks: natural-image spike maps from SpikingJelly models, synthetic spike sweeps,
per-layer and end-to-end timings against the dense baselines, reports and plots."""

__version__ = "0.1.0"
