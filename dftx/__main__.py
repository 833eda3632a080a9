"""C{python -m dftx}: the operator command (L{dftx.cli})."""

from dftx.cli import main

main()
