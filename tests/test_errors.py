"""optpipe.errors: each error kind carries the exit code the README and `optpipe --help` promise."""
import re
from pathlib import Path

import pytest

from optpipe import errors
from optpipe.cli import EXIT_CODES

PROMISED = {errors.BuildError: 1, errors.OptpipeError: 1, errors.RecipeError: 2, errors.InputError: 2,
            errors.ModelLoadError: 2, errors.GateFailed: 3, errors.ArtifactError: 4}


@pytest.mark.parametrize("kind, code", PROMISED.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_exit_codes_are_the_documented_ones(kind, code):
    assert kind.exit_code == code
    assert re.search(rf"^  {code}  \w", EXIT_CODES, re.M)  # a line of its own in `optpipe --help`
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    listed = readme[readme.index("Exit codes:"):].split("\n\n")[0]
    assert re.search(rf"(: |· ){code} \w", listed)


def test_every_error_kind_is_covered_and_input_errors_are_value_errors():
    kinds = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.OptpipeError)}
    assert kinds == set(PROMISED)
    assert issubclass(errors.InputError, ValueError)  # API callers catching ValueError keep working
    refused = errors.GateFailed("refused", {"accuracy": {"passed": False}})
    assert refused.report["accuracy"]["passed"] is False and errors.GateFailed("x").report == {}
