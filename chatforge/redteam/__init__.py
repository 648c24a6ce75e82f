"""Red-teaming one's own model: attacks (gcg.py: adversarial suffixes) and defenses (perplexity.py)."""
