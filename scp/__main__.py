"""``python -m scp`` runs the sortscp command line."""

from scp.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
