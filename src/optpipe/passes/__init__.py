"""Built-in passes: every public module here is imported, and each Pass subclass it defines registers itself."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
