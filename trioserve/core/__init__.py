"""The controller and everything it reasons about: events, state, decisions."""
