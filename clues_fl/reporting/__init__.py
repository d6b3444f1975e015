"""Reporting: model quality, the run's metrics, manifests and report."""
