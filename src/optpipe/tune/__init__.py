"""`optpipe tune`: search a recipe's option space against its own gates; emit the best candidate that passes."""
from .search import TuneResult, tune

__all__ = ["TuneResult", "tune"]
