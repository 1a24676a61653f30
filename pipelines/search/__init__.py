"""Choosing a candidate: strategies, selection, retrieval, the score cache."""
