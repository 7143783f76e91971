"""Applications built on the engine: the photo index, the built-in benchmark and the demo."""
