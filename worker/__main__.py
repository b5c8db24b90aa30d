"""`python -m worker`: the same as `idunno worker`."""

import sys

from cli.main import main

sys.exit(main(["worker", *sys.argv[1:]]))
