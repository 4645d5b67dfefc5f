"""``python -m upterm`` runs the thin client, exactly like the ``upterm`` script."""

from upterm.ctl.cli import main

if __name__ == "__main__":
    main()
