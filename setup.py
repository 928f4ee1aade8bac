"""The one compiled part of wasisup: the host-call trampoline (everything else is in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("wasisup.wasi._hostcall", ["supervisor/wasisup/wasi/_hostcall.c"],
                             extra_compile_args=["-O2"])])
