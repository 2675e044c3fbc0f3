"""The online service: request-time logic, guardrails, reasons, audit, HTTP API."""
