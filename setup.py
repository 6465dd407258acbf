"""Builds the Cython hot path: every ext/NAME.pyx becomes gorila_zmq._ext.NAME.

Flags: -O3 and -fno-math-errno (the AdaGrad loop is ~9x slower without it: sqrt must not set errno),
OpenMP when the compiler has it, never -march=native (wheels must run on any x86-64/aarch64 host).
"""
import os
import glob
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _has_openmp() -> bool:
    """Compile and link a tiny OpenMP program with the C compiler the build will use."""
    if os.environ.get("GORILA_NO_OPENMP") == "1":
        return False
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(tmp, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


def extensions():
    openmp = _has_openmp()
    compile_args = ["-O3", "-fno-math-errno", "-Wno-unreachable-code"]
    link_args = []
    if openmp:
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    print(f"gorila-zmq: building extensions with OpenMP={'on' if openmp else 'off'}", file=sys.stderr)
    exts = []
    for pyx in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(Extension(
            f"gorila_zmq._ext.{name}", [pyx],
            include_dirs=[np.get_include(), "ext"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        ))
    return cythonize(
        exts,
        include_path=["ext"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


# The four extensions compile side by side (build_ext -j): `make build` and the wheel `cluster
# bootstrap` builds take about half the time on two cores.
setup(ext_modules=extensions(), options={"build_ext": {"parallel": max(1, os.cpu_count() or 1)}})
