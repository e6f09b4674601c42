"""Defences against compliance-only backdoors; they read runs and models, nothing imports them."""
