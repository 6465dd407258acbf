"""Agents behind one protocol (base.py: Agent, Policy, Learning, and the registry `get`), one package
each: dqn/ (Gorila DQN) and drqv2/ (DrQ-v2); common.py holds the torch-free helpers they share."""
