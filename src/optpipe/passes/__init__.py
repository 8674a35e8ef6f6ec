"""Built-in passes; importing this package registers them."""
from . import export  # noqa: F401
