#!/usr/bin/env python3
"""The ssh cluster launcher: `python cluster/launch.py up|down|status|logs|restart|check SPEC [ROLE]`
(the same as `gorila-zmq cluster ...`). See gorila_zmq/launch/cluster.py and cluster/example.toml."""
import sys

from gorila_zmq.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
