"""Command-line tools of IDunno (the `idunno` console script); sits on top of every other package."""
