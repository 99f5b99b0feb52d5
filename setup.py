"""Build script: compiles blocknode/_fastpath.pyx when a C compiler is present.

The extension is optional: without a compiler (or without Cython) the install
still succeeds and blocknode runs on its pure-Python twin, with a warning.
`cythonize()` drops `optional=True` from the Extension it is given, so it is set
again on the objects it returns.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns loudly instead of failing when the compile fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the twin"
            _warn(f"could not build the compiled fast path ({exc})")

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _warn(f"could not compile {ext.name} ({exc})")


def _warn(msg: str) -> None:
    print(
        f"\nWARNING: blocknode: {msg}; the pure-Python fast path will be used.\n",
        file=sys.stderr,
    )


def _extensions() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed")
        return []
    exts = cythonize(
        [Extension("blocknode._fastpath", ["blocknode/_fastpath.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
    for ext in exts:
        ext.optional = True
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
