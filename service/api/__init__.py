"""HTTP tier: routes validate and map status codes; the engine does the work."""
