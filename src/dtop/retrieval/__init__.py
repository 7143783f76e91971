"""Search, metrics (the revisited protocol) and post-processing of descriptors."""
