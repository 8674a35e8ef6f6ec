"""Built-in passes; importing this package registers them."""
from . import export, fuse, quantize_int4, quantize_int8, smoothquant, static_kv_cache  # noqa: F401
