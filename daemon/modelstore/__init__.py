"""The served models: the repository on disk, each model's config.toml, the ServedModel objects."""
