"""Federation: what travels between server and sites, and what a run needs around it (preflight, resume, console, processes, an in-memory grid)."""
