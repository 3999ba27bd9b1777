"""Real processes and real load for the tests and the benchmark, on 127.0.0.1 only:
smart (or another app) under gunicorn exactly as production starts it, and wrk.

Every wait is bounded, and only processes started here are stopped, by their PID.
"""
