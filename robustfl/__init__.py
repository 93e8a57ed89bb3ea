"""robustfl: a fast, reproducible simulator for poisoning-robust federated learning."""
__version__ = "0.1.0"
