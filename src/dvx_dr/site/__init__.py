"""One site: its store of volumes and snapshots, its keys, and its HTTP API."""
