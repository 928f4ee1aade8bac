"""wasisup: a gunicorn-style supervisor for WebAssembly components of the wasi:http/proxy world."""

__version__ = "0.1.0"
