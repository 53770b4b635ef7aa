"""Deterministic simulations of the controller: real decisions, simulated world."""
