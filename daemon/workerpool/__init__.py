"""The worker processes: spawning, their handles and state machine, what they hold in flight, what they send."""
