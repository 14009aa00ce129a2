"""The live dashboard: static page and the routes that serve it (mounted by engine.api)."""
