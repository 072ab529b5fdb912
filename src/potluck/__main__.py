"""`python -m potluck ...` is the same as the `potluck` console script (torchrun runs it this way)."""

from potluck.cli import main

main()
