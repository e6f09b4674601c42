"""suretrap: reproduce, measure and defend against compliance-only backdoors in fine-tuned LLMs."""

__version__ = "0.1.0"
