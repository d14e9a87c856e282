"""Build the optional C++ kernels (solarjax/kernels/*.cc); metadata lives in setup.cfg.

The extension is ``optional``: without a C++ compiler (or jaxlib's FFI headers) the install goes
on and solarjax falls back to pure JAX (solarjax.kernels.cpu_int8.available() is then False).
"""

import os
import platform

from setuptools import Extension, setup


def _ffi_include() -> list[str]:
    """XLA's FFI headers, shipped inside jaxlib (a build requirement in pyproject.toml)."""
    try:
        import jaxlib
    except ImportError:
        return []
    include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
    return [include] if os.path.isdir(os.path.join(include, "xla", "ffi", "api")) else []


def _extensions() -> list[Extension]:
    include = _ffi_include()
    if not include or platform.machine().lower() not in ("x86_64", "amd64"):
        return []  # the kernel is x86 SIMD; elsewhere the pure-JAX path runs
    return [Extension("solarjax.kernels._cpu_int8_matvec", ["solarjax/kernels/cpu_int8_matvec.cc"],
                      include_dirs=include, language="c++", optional=True,
                      extra_compile_args=["-O3", "-std=c++17", "-w"])]


setup(ext_modules=_extensions())
