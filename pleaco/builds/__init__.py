"""The build pipeline: repository connections, webhooks, source, builders, tests, scan, release."""
