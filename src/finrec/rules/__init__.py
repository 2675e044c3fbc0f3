"""Hard rules that run before any scoring: eligibility and suitability."""
