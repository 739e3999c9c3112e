"""fixres: fix the train-test resolution discrepancy of image classifiers (FixRes, NeurIPS 2019).

The package is light to import: torch is only imported by the modules that need it.
"""

__version__ = "0.1.0"
