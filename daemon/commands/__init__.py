"""The `openinfer` commands' parts besides serving: infer helpers, tables, deployment checks."""
