"""Moving snapshots between sites: protocol, sender, receiver, mutual TLS, PKI, scheduler."""
