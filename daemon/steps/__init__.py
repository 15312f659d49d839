"""Processing steps: a model's pre step (what a client sends -> the model's tensors) and post step (the
model's outputs -> what the client gets), run inside the model's worker under its sandbox, never in the
supervisor. `config.toml` names the module that holds them (steps_config.py); the worker reads it before
its sandbox closes (sources.py), loads it (loader.py) and runs it around the model (runner.py).
The contract a steps module follows is in contract.py and docs/STEPS.md."""
