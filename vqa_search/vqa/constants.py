"""Defaults of the VQA commands, importable without torch: the command line's help reads them, and
`vqa/train.py` and `vqa/ask.py` import them from here."""

DEFAULT_LOCAL_MODEL = "ViT-B-16"  # the dual heads' second, local-detail image encoder
DEFAULT_LOCAL_PRETRAINED = "laion2b_s34b_b88k"
DEFAULT_TOP_ANSWERS = 5  # the head's answers `ask` shows
