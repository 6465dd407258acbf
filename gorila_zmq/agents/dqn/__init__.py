"""DQN as Gorila trains it: networks.py (Nature CNN, MLP), learning.py (the TD loss), agent.py (the
Agent: epsilon-greedy acting, target sync every N global updates), config.py (the [dqn] section)."""
