"""Aggregation rules (pure functions on an (n, d) tensor) and the defenses that call them."""
