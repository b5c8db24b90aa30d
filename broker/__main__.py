"""`python -m broker`: the same as `idunno coordinator`."""

import sys

from cli.main import main

sys.exit(main(["coordinator", *sys.argv[1:]]))
