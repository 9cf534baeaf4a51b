"""Names and defaults of the alignment stages, importable without torch: the command line's help and
`vqa-search info` read them, and the modules that compute regions and re-rank import them from here."""

REGIONS_DIR = "regions"  # INDEX_DIR/regions/<set name>/: one region set per extractor
DEFAULT_REGIONS = 36  # regions per image from a detector (clip-patches: one per ViT patch)
RERANKER_FILE = "reranker.safetensors"  # INDEX_DIR/<this>: where `train rerank` writes and `query --rerank` looks
DEFAULT_TOP = 50  # global candidates the re-ranker re-scores per query
