"""The hedging algorithm and the outcome of an attempt: no Flask, no sockets."""
