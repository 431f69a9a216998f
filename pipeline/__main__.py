"""`python -m pipeline` = the `capline` command."""

from pipeline.cli import main

main()
