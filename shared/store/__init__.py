"""The activation store: its layout (schema), the write records of its writers, checksum verification and
where a store lives (local path or fsspec URL)."""
