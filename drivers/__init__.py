"""Device protocols (pure, sans-I/O) and their transports. Imports nothing of ours."""
