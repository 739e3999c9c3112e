"""Choosing the test size: which photos choose, the candidate sizes and their time budget, per-photo outcomes,
the significance tests, the one best-size rule and what is served. Pure functions: no torch, no I/O."""
