"""Engines that run models over data: extraction and training."""
