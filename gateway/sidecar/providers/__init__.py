"""Where gang members run: `local` (subprocesses, the embedded default); a Ray provider fits the same API."""
