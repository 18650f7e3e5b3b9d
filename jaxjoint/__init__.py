"""jaxjoint: exact pairwise joint distributions derived from masked language models."""
