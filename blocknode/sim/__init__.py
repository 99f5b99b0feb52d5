"""Deterministic simulation of a blocknode cluster (see README, "Simulation")."""
