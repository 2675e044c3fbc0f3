"""Ranking: models that score (customer, product) candidates, such as the approval-odds model."""
