"""Data: the contract, reading and validating datasets, and the synthetic world."""
