"""Scripts that turn public recommendation datasets into the CTR parquet layout of :mod:`recsys_embed.data.schema`."""
