"""Analysis of recorded runs: decomposition per scenario."""
