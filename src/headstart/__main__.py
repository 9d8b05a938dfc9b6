"""`python -m headstart` runs the command line."""

from headstart.cli import main

main()
