"""nimbleml: real-time deep learning for portfolio risk forecasting and sequential recommendation."""

__version__ = "0.1.0"
