"""Small shared helpers: atomic file writing, JSON."""
