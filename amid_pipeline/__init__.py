"""amid-pipeline: cache a teacher LLM's top-k log-probabilities once, distill students from them."""

__version__ = "0.1.0"
