"""Selection: threshold rules, the keep rule, privacy of what sites report, and quality metrics."""
