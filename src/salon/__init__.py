"""salon — a self-hostable, ChatGPT-class assistant platform."""

__version__ = "0.1.0"
