"""Shared machinery below the four features: model loading and identity, encoders, image decoding and
the decode -> encode runner, the generation-directory store, FAISS, safetensors artifacts, training
helpers and plots. Nothing here imports a feature (indexer, retrieval, align, vqa) or the CLI."""
