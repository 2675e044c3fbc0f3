"""The synthetic financial world: customers, catalogue, ground truth and funnel events."""
