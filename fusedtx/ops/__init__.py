"""The public functional API, one module per family, each with the same three parts: validation at
the public boundary, ``torch.library`` custom ops (fake impls, autograd), and the dispatch call.

Every op is a ``torch.library.custom_op`` in the ``fusedtx`` namespace, so ``torch.compile`` traces it
as one opaque node (``fullgraph=True``, no graph break) and autograd runs its own backward op. Inside
each custom op, :func:`fusedtx._backend.select` picks the backend for that call; forward and backward
choose independently and any choice is correct for any other.

The functions are exported at the top level (``fusedtx.attention``, ...); this package holds the family
modules (``fusedtx.ops.attention`` is the module) and :mod:`fusedtx.ops.common`, what they share.
"""
