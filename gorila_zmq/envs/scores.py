"""Human-normalised scores: 100 * (agent - random) / (human - random).

For the 49 games of the DQN Nature paper (Mnih et al. 2015, Extended Data Table 2: random play and the
professional human tester) its scores, to one decimal (gorila_zmq/data/nature_dqn_random_human.csv;
Pong: -20.7 and 9.3); for the other ALE games, the table DeepMind published with DQN Zoo
(atari_random_human.csv), whose human scores differ from the Nature paper's for 34 of the 49. Each
result names the table it used.
"""
from __future__ import annotations

import csv
import functools
from importlib import resources

import numpy as np

from gorila_zmq.envs import is_atari
from gorila_zmq.envs.atari import UnknownGameError, resolve_game

NATURE_TABLE = "DQN Nature paper, Extended Data Table 2 (nature_dqn_random_human.csv)"
ZOO_TABLE = "DQN Zoo random/human scores (atari_random_human.csv)"


def _norm_key(game: str) -> str:
    try:
        game = resolve_game(game)           # PongNoFrameskip-v4, ALE/Pong-v5, space_invaders ... -> the ROM id
    except UnknownGameError:
        pass
    return game.split("/")[-1].split("-")[0].replace("_", "").lower()


@functools.lru_cache(maxsize=None)
def _read_table(name: str) -> dict[str, tuple[float, float]]:
    with resources.files("gorila_zmq.data").joinpath(name).open() as f:
        return {row["game"].replace("_", "").lower(): (float(row["random"]), float(row["human"]))
                for row in csv.DictReader(f)}


def normalization_table(game: str) -> tuple[str, float, float] | None:
    """(table name, random, human) for an ALE game: the Nature paper's for its 49, else DQN Zoo's."""
    key = _norm_key(game)
    for name, path in ((NATURE_TABLE, "nature_dqn_random_human.csv"), (ZOO_TABLE, "atari_random_human.csv")):
        rh = _read_table(path).get(key)
        if rh is not None:
            return name, rh[0], rh[1]
    return None


def human_normalized(game: str, score: float) -> float | None:
    t = normalization_table(game)
    if t is None:
        return None
    _, rnd, human = t
    return 100.0 * (score - rnd) / (human - rnd)


def summarize(game: str, returns: list[float]) -> dict:
    mean = float(np.mean(returns)) if returns else float("nan")
    out = {"episodes": len(returns), "return_mean": mean,
           "return_median": float(np.median(returns)) if returns else float("nan"),
           "return_min": float(np.min(returns)) if returns else float("nan"),
           "return_max": float(np.max(returns)) if returns else float("nan")}
    if is_atari(game):
        out["human_normalized"] = human_normalized(game, mean)
        out["normalization_table"] = normalization_table(game)[0] if out["human_normalized"] is not None else None
    return out
