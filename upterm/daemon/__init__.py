"""The per-user daemon: owns every hosted session (PTY, inner SSH server, relay tunnel)."""
