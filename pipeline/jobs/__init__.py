"""The shard jobs and their skeleton: the runner, compress, verify/restore, get."""
