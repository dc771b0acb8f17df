"""SciPy's LAPACK Cholesky factor and BLAS triangular solve, called without holding the GIL.

`scipy.linalg.cholesky` and `solve_triangular` (f2py wrappers) hold the GIL for the whole LAPACK call: on 2
cores, a Python thread beside a 1280-dimensional triangular solve kept 26-29 % of its speed, beside a
Cholesky factor ~50 %. The trust fit's held-out novelty groups make one of each per group (~50 ms) while the
head's and the fold heads' L-BFGS steps, whose Python parts need the GIL between their products, run on
the other core. These call the same routines of the same library (SciPy's OpenBLAS, through its public
Cython API `scipy.linalg.cython_lapack` / `cython_blas`) through ctypes, which releases the GIL for the
call, so the results are those of `scipy.linalg.cholesky(a, lower=True)` and
`solve_triangular(factor, b, lower=True)` to the bit."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

_char, _int, _float = ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_void_p


@cache
def _routine(module_name: str, name: str, *argtypes: Any) -> Callable[..., None]:
    """The C function behind a `scipy.linalg.cython_*` routine, as a ctypes function (it releases the GIL)."""
    import importlib

    capsule = importlib.import_module(module_name).__pyx_capi__[name]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(address)


def _ints(*values: int) -> list[Any]:
    return [ctypes.byref(ctypes.c_int(value)) for value in values]


def cholesky_lower(a: np.ndarray) -> np.ndarray:
    """The lower Cholesky factor L (n, n) float32, Fortran-ordered, of a symmetric positive-definite float32
    matrix `a` (n, n), C- or Fortran-contiguous, which it overwrites (its buffer becomes the factor's).
    Raises numpy.linalg.LinAlgError when `a` is not positive definite."""
    if a.dtype != np.float32 or a.ndim != 2 or a.shape[0] != a.shape[1] or not (
            a.flags.c_contiguous or a.flags.f_contiguous):
        raise ValueError(f"expected a contiguous square float32 matrix, got {a.dtype} {a.shape}")
    factor = a if a.flags.f_contiguous else a.T  # symmetric: its transpose is the same matrix, in Fortran order
    n, info = len(factor), ctypes.c_int(0)
    potrf = _routine("scipy.linalg.cython_lapack", "spotrf", _char, _int, _float, _int, _int)
    potrf(b"L", *_ints(n), factor.ctypes.data, *_ints(n), ctypes.byref(info))
    if info.value:
        raise np.linalg.LinAlgError(f"the matrix is not positive definite (potrf info {info.value})")
    factor[np.triu_indices(n, 1)] = 0.0  # LAPACK leaves the other triangle as it was
    return factor


def solve_lower(factor: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """L⁻¹·rowsᵀ (n, m) float32 for a lower-triangular Fortran-ordered float32 `factor` L (n, n)
    (`cholesky_lower`'s) and C-contiguous float32 `rows` (m, n), which it overwrites: the result is the
    transposed view of their buffer (rowsᵀ in Fortran order is the right-hand side, solved in place)."""
    if (factor.dtype != np.float32 or not factor.flags.f_contiguous or rows.dtype != np.float32
            or not rows.flags.c_contiguous or rows.shape[1:] != factor.shape[:1]):
        raise ValueError(f"expected a Fortran-ordered float32 factor and C-ordered float32 rows of its width, "
                         f"got {factor.dtype} {factor.shape} and {rows.dtype} {rows.shape}")
    solved = rows
    n, m = factor.shape[0], len(solved)
    if m:
        trsm = _routine("scipy.linalg.cython_blas", "strsm", _char, _char, _char, _char, _int, _int, _float,
                        _float, _int, _float, _int)
        one = ctypes.c_float(1.0)
        trsm(b"L", b"L", b"N", b"N", *_ints(n, m), ctypes.byref(one), factor.ctypes.data, *_ints(n),
             solved.ctypes.data, *_ints(n))
    return solved.T
