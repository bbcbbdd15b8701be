"""Data stages' library: ingest sources into parquet shards, then clean, deduplicate and anonymise them."""
