"""The network layer: the wire protocol (header, commands, validation), topology (who listens where),
security (CurveZMQ keys, ZAP) and rpc (the one Lazy Pirate request helper). Imports nothing above it."""
