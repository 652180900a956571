"""The chat use cases: take a user turn, build the context, run a generation job, persist it."""
