"""Features: point-in-time customer, product and pair features, and the temporal split."""
