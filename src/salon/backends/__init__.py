"""Text backends: one typed streaming seam (`base.TextBackend`) and its adapters."""
