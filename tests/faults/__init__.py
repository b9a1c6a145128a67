"""The fault campaign of issue 21: one module per class of failure (a package, so that its module names
cannot collide with tests/test_<module>.py)."""
