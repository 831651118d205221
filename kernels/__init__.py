"""Low-level kernels: bit packing, group quantization and attention over segments.

Every kernel has a plain-torch reference in :mod:`kernels.reference`; the Triton versions live beside it and are
tested against the reference on fresh random inputs. This package imports only torch (and triton, lazily).
"""
