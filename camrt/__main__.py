"""`python -m camrt` runs the camrt CLI."""

from camrt.cli import main

main()
