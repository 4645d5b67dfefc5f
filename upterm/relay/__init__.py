"""uptermd, the relay: hosts register sessions, joiners reach them by token."""
