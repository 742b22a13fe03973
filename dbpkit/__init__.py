"""dbpkit: the plumbing of the Density-Based Pruning scripts, one module per concern.

The method itself and the loader API are `dbp_utils.py`, beside the scripts; nothing here imports it. Read
in the order a run goes: `cli` (flags, one-line errors, signals at safe points), `savedir` (output folders
published whole), `files`, `tasks` and `ray_engine` (the worker processes or Ray tasks), then one module
per kind of data: `keys`, `trie`, `clusters`, `layouts`, `kmeans`, `nemo`, `dedup`, `encoder`, `shards`,
`selection`, `prune_report`, `cluster_report`. `faults` holds the hooks that stop a run at a named point
for the fault tests.
"""

__version__ = "0.5.0"
