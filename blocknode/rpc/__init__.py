"""blocknode RPC: sans-io framing and handshake, Trio connections, the node network."""
