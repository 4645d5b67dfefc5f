"""``python -m upterm.daemon`` runs the daemon in the foreground (what ``upterm daemon`` does)."""

from upterm.daemon.main import main

if __name__ == "__main__":
    main()
