"""The server side of the CLUES protocol, in parts with one job each (strategies/clues.py
`CluesStrategy` puts them together): the protocol's state (state.py), the sites as the
server knows them (sites.py), the rounds of a phase (rounds.py), the phases and their
driver (phases.py), the server's own data (data.py), scores pooled across sites
(scores.py) and the summaries the report reads (summary.py)."""
