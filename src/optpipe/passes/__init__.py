"""Built-in passes; importing this package registers them."""
from . import (  # noqa: F401
    awq,
    export,
    fp16,
    fuse,
    ipex_optimize,
    qdq_int4,
    qdq_int8,
    quantize_embedding,
    quantize_int4,
    quantize_int8,
    smoothquant,
    static_kv_cache,
    torch_bf16,
    torch_fuse,
    torch_quantize,
    torch_static_kv_cache,
)
