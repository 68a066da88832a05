"""rankdown.validate (folder runtime_tests/): validate exported bundles in their real runtimes (accuracy and latency)."""
