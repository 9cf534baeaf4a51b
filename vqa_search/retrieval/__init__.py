"""Query time: FAISS indexes, the searcher, metrics and result rendering."""
