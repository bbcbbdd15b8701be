"""Measuring a model: bits per byte over documents (`evaluate`), compression baselines
(`compression`), and stereotype preference on minimal pairs (`bias`)."""
