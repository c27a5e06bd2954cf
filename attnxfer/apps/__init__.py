"""Applications: the only code that turns a config into objects (runs, conversion, demo, reports)."""
