"""Bank simulator: a separate process with its own LMDB ledger."""
