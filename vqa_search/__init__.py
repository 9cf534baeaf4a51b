"""vqa-search: search photo collections by meaning with CLIP and FAISS.

    from vqa_search import Index
    index = Index.build("./flickr8k")  # later: Index.open("./flickr8k")
    hits = index.search(text="dog on beach", k=5)
"""

__version__ = "0.1.0"
__all__ = ["Index", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import vqa_search` (and the version) does not pull in torch.
    if name == "Index":
        from vqa_search.retrieval.searcher import Index

        return Index
    raise AttributeError(f"module 'vqa_search' has no attribute {name!r}")
