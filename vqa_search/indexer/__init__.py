"""Indexing: dataset reader -> image/caption encoders -> shard writer -> committed index directory."""
