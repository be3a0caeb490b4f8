"""Tiny offline worlds with ground truth, so alignment can be shown to work without a model hub."""
