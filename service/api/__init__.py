"""HTTP tier: routes validate and map status codes; the runtime's device thread does the work."""
