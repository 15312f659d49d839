"""The wire protocol in one place, shared by the daemon and every Python client: ZMTP framing
(`zmtp`; `sealed` for a security mechanism that seals every frame, CurveZMQ), the msgpack header codec and limits (`protocol`), tensor encoding (`tensors`) and the error
codes (`errors`). Nothing here imports ZeroMQ or onnxruntime: sandboxed workers import it too."""
