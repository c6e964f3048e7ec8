"""Data: webdataset shards, streaming loaders, the synthetic generator."""
