"""Seed aggregation, paper tables, figures, sweeps."""
