"""`python -m optpipe` is the `optpipe` command."""
import sys

from .cli import main

sys.exit(main())
