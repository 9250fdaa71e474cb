"""Workload 1: portfolio risk forecasting from images of market history."""
