"""`python -m headstart` runs the command line."""

from headstart.cli.commands import main

main()
