"""Build of the optional C merge kernel, ``gossipfl._merge``.

Everything else about the package is declared in pyproject.toml; this file only adds
the extension. ``pip install .`` compiles it against the numpy present at build time
(numpy is a build requirement). When it cannot be compiled (no compiler, no Python
headers, no numpy headers) the build logs a warning and installs the package without
it, and gossipfl.merge uses the numpy reference. ``GOSSIPFL_REQUIRE_C=1`` turns that
fallback into a build failure, for CI and for packaging.

For the test suite, build it next to the sources: ``python setup.py build_ext
--inplace``.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

REQUIRE_ENV = "GOSSIPFL_REQUIRE_C"

# -ffp-contract=off: no FMA contraction, so float32 results equal numpy's bit for bit.
COMPILE_ARGS = ["-O3", "-ffp-contract=off", "-std=c11", "-Wall", "-Wextra"]

BUILD_ERRORS = (CCompilerError, CompileError, ExecError, PlatformError, OSError)


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _warn(message: str) -> None:
    print(f"WARNING: {message}; gossipfl will use the numpy merge path",
          file=sys.stderr)


class OptionalBuildExt(build_ext):
    """``build_ext`` that treats a failed C build as a warning, unless required."""

    def finalize_options(self) -> None:
        super().finalize_options()
        try:
            import numpy
        except ImportError:
            if _required():
                raise
            _warn("numpy is not importable at build time")
            self.extensions = []
            return
        for ext in self.extensions:
            ext.include_dirs.append(numpy.get_include())

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            if _required():
                raise
            _warn(f"the C merge kernel could not be built ({exc})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            if _required():
                raise
            _warn(f"the C merge kernel could not be built ({exc})")


setup(
    ext_modules=[
        Extension("gossipfl._merge", sources=["gossipfl/_merge.c"],
                  extra_compile_args=COMPILE_ARGS),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
