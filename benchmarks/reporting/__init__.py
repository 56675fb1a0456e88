"""Reports built from run records: tables, plots, the papers' numbers beside ours, claims."""
