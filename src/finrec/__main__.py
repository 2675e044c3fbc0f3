"""``python -m finrec`` runs the command line."""

from finrec.cli import main

main()
