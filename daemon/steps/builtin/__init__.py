"""Steps that ship with OpenInfer, for the published models in examples/models (`module = "openinfer:<name>"`)."""
