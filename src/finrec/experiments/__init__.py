"""A/B testing: which arm a customer is in (assignment) and what the arms did (analysis)."""
