"""nn.Modules built on attnmem's ops."""

from attnmem.nn.additive import (
    AdditiveAttention,
    HardAttention,
    LuongAttention,
    PointerAttention,
)
from attnmem.nn.attention import (
    MultiheadSelfAttention,
    SinusoidalPositionalEncoding,
    TransformerEncoderLayer,
    alibi_slopes,
)
from attnmem.nn.distributed import ShardedKeyValueMemory
from attnmem.nn.memory import NTM, KeyValueMemory, MemN2N, NTMState
from attnmem.nn.multihead import MultiheadAttention
from attnmem.nn.product_key import ProductKeyMemory

__all__ = ["NTM", "NTMState", "MemN2N", "KeyValueMemory", "ShardedKeyValueMemory",
           "ProductKeyMemory", "AdditiveAttention", "HardAttention",
           "LuongAttention", "PointerAttention", "MultiheadAttention", "MultiheadSelfAttention",
           "SinusoidalPositionalEncoding", "TransformerEncoderLayer", "alibi_slopes"]
