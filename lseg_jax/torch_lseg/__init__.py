"""Self-contained PyTorch LSeg (no dependency on the official lang-seg repository)."""
