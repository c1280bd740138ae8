"""Prefect tasks: each runs one engine stage on one shard (or one reduce)."""
