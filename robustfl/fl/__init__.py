"""The federated-learning loop: one cell's simulation, the experiment glue, metrics."""
