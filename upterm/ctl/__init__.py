"""The thin client: the ``upterm`` command."""
