"""The processes of a run, built on one role base (roles/base.py): ps (a parameter-server shard), replay
(a global replay shard), actor, learner, evaluator. A role talks to its agent only through
gorila_zmq.agents.base.Agent; no role holds an agent-specific branch."""
