"""smart: a hedging proxy in front of one unreliable upstream endpoint."""
