"""Weights in and out: official checkpoints <-> this project's Flax params."""
