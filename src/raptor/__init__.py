"""Raptor: a toolkit for the Block-Recurrent Hypothesis of Vision Transformers.

Layer convention everywhere: layer 0 is the embedding output (tokens entering block 1), layer l is the
output of block l, so a depth-L teacher has L+1 layers. A *trajectory* is a tensor (batch, layers, tokens, dim).
"""

from raptor.errors import RaptorError

__version__ = "0.1.0"
__all__ = ["RaptorError", "__version__"]
