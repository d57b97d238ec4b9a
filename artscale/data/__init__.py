"""Images in and out: decoding and validation, collections, packing into shards, the loaders, listings."""
