"""Small programs that store uploaded files in blocknode (see README, "Using blocknode
from your program"); each is exercised by tests/cluster/test_examples.py."""
