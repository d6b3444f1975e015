from clues_fl.federation.console import quiet_warnings as _quiet_warnings

_quiet_warnings()  # before torch / transformers / Ray are imported (CLUES_FL_VERBOSE=1 keeps them)
