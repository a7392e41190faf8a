"""The Ray Tune sweep service: search-space files, trial expansion, launch, resume."""
