"""nn.Modules built on attnmem's ops."""

from attnmem.nn.attention import (
    MultiheadSelfAttention,
    SinusoidalPositionalEncoding,
    TransformerEncoderLayer,
)
from attnmem.nn.memory import NTM, KeyValueMemory, MemN2N, NTMState

__all__ = ["NTM", "NTMState", "MemN2N", "KeyValueMemory", "MultiheadSelfAttention",
           "SinusoidalPositionalEncoding", "TransformerEncoderLayer"]
