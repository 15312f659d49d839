"""Settings: the typed settings model, path settings, policy file reading."""
