"""blocknode: a distributed, content-addressed block store node."""

__version__ = "0.1.0"
