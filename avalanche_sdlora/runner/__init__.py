"""The experiment runner: config, command line, preflight checks, data streams, backbones,
baselines and the run folder's outputs. It builds on the method (:mod:`avalanche_sdlora`); the method
never imports it."""
