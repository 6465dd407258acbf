"""What lives on one host: named shared-memory segments, atomic file writes, per-process logging."""
