"""The serving loop: the asynchronous engine, its resident references and its metrics."""
