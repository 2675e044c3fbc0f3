"""Customer feedback events as they arrive at ``POST /events``: validation and the durable event log."""
