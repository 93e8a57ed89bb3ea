"""Datasets, client partitions and the server's data sets (auxiliary, root, backdoor)."""
