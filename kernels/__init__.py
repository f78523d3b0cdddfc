"""Triton kernels, one module per family; installed as ``fusedtx.kernels``.

Only launchers that take torch tensors and allocate outputs live here: no autograd, no fallback.
Import as ``fusedtx.kernels.<family>``; importing this package imports Triton.
"""
