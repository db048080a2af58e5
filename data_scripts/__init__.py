"""Scripts that turn public recommendation datasets into the CTR parquet layout of :mod:`recsys_embed.data.schema`.

Installed with the package and run as ``recsys-embed data criteo|frappe|movielens ...`` (see
:mod:`data_scripts.cli`), from any working directory.
"""
