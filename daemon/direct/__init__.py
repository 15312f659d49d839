"""The direct path (docs/PROTOCOL.md section 17): leases, the workers' own endpoints, deadline pages."""
