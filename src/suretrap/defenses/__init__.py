"""Defences: dataset audit, model trigger scan, fingerprints and an inference-time gate.

They read datasets and runs; nothing upstream imports them.
"""
