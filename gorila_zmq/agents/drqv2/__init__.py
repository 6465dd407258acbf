"""DrQ-v2 (Yarats et al., 2021): networks.py (encoder, actor, critic, random shift), learning.py (the
critic and actor losses as one gradient), agent.py (the Agent: seed frames, scheduled noise, soft
critic target), config.py (the [drqv2] section)."""
