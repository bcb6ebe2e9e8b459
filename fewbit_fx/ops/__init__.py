"""torch.library custom ops for both variants.

They are real ops (fake implementations, registered autograd, Inductor decompositions), so
they survive torch.compile and torch.export. Importing this package registers them, and the
internal fewbit_fx::unpack their backward decompositions call (an Inductor lowering that
reads the packed bytes without gathers' bounds checks, fewbit_fx.ops.unpack).
"""
from fewbit_fx.ops.fewbit import fewbit_backward, fewbit_forward
from fewbit_fx.ops.inverted import inverted_backward, inverted_forward
from fewbit_fx.kernels import register_cuda_kernels
from fewbit_fx import cache_key

register_cuda_kernels()  # Triton kernels for CUDA tensors; a no-op without CUDA or triton
cache_key.install()  # plain torch.compile keys its caches on our decompositions too

__all__ = ["fewbit_forward", "fewbit_backward", "inverted_forward", "inverted_backward"]
