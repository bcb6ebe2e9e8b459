"""torch.library custom ops for both variants.

They are real ops (fake implementations, registered autograd, Inductor decompositions), so
they survive torch.compile and torch.export. Importing this package registers them, and the
internal fewbit_fx::unpack their backward decompositions call; their Inductor side
(decompositions, the unpack lowering, the cache key) is registered on first use of the
compiler (fewbit_fx.ops.inductor).
"""
from fewbit_fx.ops.fewbit import fewbit_backward, fewbit_forward
from fewbit_fx.ops.inverted import inverted_backward, inverted_forward
from fewbit_fx.ops.norm import inverted_norm_backward, inverted_norm_forward
from fewbit_fx.kernels import register_cuda_kernels

register_cuda_kernels()  # Triton kernels for CUDA tensors; a no-op without CUDA or triton

__all__ = ["fewbit_forward", "fewbit_backward", "inverted_forward", "inverted_backward",
           "inverted_norm_forward", "inverted_norm_backward"]
