"""The Flower strategies: CluesStrategy (the CLUES protocol, strategies/clues.py) and
SiteRounds (the rounds of one phase around any Flower strategy, strategies/site_rounds.py).
`from clues_fl.strategies import CluesStrategy` loads them when first asked for (the
server's parts import site_rounds from here)."""


def __getattr__(name: str):
    if name == "CluesStrategy":
        from clues_fl.strategies.clues import CluesStrategy

        return CluesStrategy
    if name in ("SiteRounds", "SiteDP"):
        from clues_fl.strategies import site_rounds

        return getattr(site_rounds, name)
    raise AttributeError(f"module 'clues_fl.strategies' has no attribute '{name}'")
