"""Accepted tasks on their way: queues, dispatch of single tasks and batches, results back to replies."""
