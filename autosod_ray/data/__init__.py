"""Data plumbing: URIs, image decoding, Parquet schema, Ray Data pipelines (no maths)."""
