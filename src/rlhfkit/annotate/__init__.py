"""Simulated annotators: gold scorers plus Bradley-Terry (Plackett-Luce) label noise."""
