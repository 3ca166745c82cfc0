"""egress-conformance: one corpus of hostile and ordinary requests, scored by loopback canaries, for any egress."""
