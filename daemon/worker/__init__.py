"""The worker process: boots into its sandbox, holds one onnxruntime session, runs tasks the supervisor sends.

Nothing in this package is imported by the supervisor except `bootconfig` and `messages` (no onnxruntime).
"""
