"""``python -m specdec.cli`` runs the ``specdec-local`` command."""

from . import main

main()
