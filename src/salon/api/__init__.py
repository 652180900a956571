"""The only HTTP layer: routes, authentication, validation, SSE encoding, error mapping."""
