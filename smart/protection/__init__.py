"""Self-protection of a worker: admission, its limits and shedding at the WSGI edge."""
