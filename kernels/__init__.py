"""Triton kernels, one module per family; installed as ``fusedtx.kernels``.

Only launchers that take torch tensors and allocate outputs live here: no autograd, no fallback. A leaf:
nothing here imports from the rest of fusedtx (the modules import each other relatively). Import as
``fusedtx.kernels.<family>``; a family module imports Triton, ``support`` does not.
"""
