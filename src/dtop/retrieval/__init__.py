"""Search, metrics (the revisited protocol), post-processing and the descriptor store (docs/retrieval.md)."""
