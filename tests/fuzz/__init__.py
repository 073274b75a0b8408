"""Fuzz tests: random and mutated input through the real tdproxy process (``scripts/fuzz``)."""
