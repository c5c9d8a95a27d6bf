"""Builders shared by the test modules (and the explorer benchmark): models, transcoders, graphs, features."""
