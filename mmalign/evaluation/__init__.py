"""Held-out evaluation every modality shares: generic evaluators, classifier rewards and sample tables."""
