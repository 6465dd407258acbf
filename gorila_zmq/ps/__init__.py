"""The parameter server as a library: the flat parameter layout and its shard ranges, shard state
(theta + optimiser state in shared memory, checkpoints), the server-side optimisers, and the client side
(gradient pusher, parameter subscriber, blocking fetch). The shard process itself is roles/ps.py."""
