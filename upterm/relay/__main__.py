"""``python -m upterm.relay`` runs uptermd."""

from upterm.relay.main import main

if __name__ == "__main__":
    main()
