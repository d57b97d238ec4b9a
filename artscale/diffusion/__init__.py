"""Noise schedules, starting noise per key and the one sampling loop; no network here (diffusers' rule)."""
