"""Choosing a candidate: the grid and its strategies, selection, retrieval, the score cache,
and the scorer pool the search calls (`pool.py`; the run implements it over Ray)."""
