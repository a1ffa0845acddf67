"""CUDA kernels of gpucrypt, written with numba-cuda (installed as ``gpucrypt.kernels``).

Each module holds one primitive. Kernels take device arrays and integers only;
they know nothing of Python objects, frameworks or user-facing errors. The
launchers beside them check nothing a caller could get wrong: the backend
(``gpucrypt/backends/gpu.py``) validates, enforces counter limits and builds
the segment tables before calling them. See ``README.md`` in this folder.
"""
