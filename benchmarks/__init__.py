"""pyllm's benchmark suite: one ``bench_<op>.py`` per op over a shared harness (``harness.py``), the
end-to-end training step (``bench_train_step.py``), the results store and its renderer.

Run ``python -m benchmarks --help`` from the repository root, or ``pytest benchmarks/ --benchmark-only``.
See README.md in this directory for the suites and the exact GPU commands.
"""
