"""gorila-zmq: a ZeroMQ cluster runtime for distributed deep RL (Gorila DQN, DrQ-v2)."""

__version__ = "0.1.0"
