"""Data: reading samples from files and bundled QA sets, splitting them into sites, and the experiments' pollution."""
