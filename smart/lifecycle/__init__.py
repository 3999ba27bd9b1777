"""A worker's life: its runtime, gunicorn's worker class and graceful shutdown."""
