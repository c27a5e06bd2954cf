"""`attnxfer convert`: the command, its stages, measurements, selection, comparison and report."""
