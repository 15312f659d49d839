"""Files and directories the daemon trusts or must not trust: private and runtime directories, model files, prepared weights."""
