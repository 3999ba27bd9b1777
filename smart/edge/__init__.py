"""The HTTP edge: the /api/smart view, its parameters, and errors rendered as JSON."""
