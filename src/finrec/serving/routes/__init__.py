"""HTTP routes, one module per resource; handlers are thin: validate, call the Recommender, answer."""
