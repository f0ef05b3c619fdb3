"""tools/: what a user runs beside training (memory and time plans, benchmarks, GPU checks,
converters). Tools may import the training code; nothing on the training path imports them
(tests/test_imports.py)."""
