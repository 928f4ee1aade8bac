"""The WASI 0.2 host, in Python: one module per WASI package, bound by ``linker``."""
