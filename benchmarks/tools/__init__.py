"""Developer tools: speed ratios (perf), the RELA toy study, score export."""
