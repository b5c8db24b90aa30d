"""The coordinator: membership, SDFS master, jobs, fair scheduling, statistics, failover."""
