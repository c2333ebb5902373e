"""Past one machine, on Ray: load shards as actors, node agents, one clock (the [ray] extra)."""
