"""The node's background workers: resync, scrub, repair and reference anti-entropy."""
