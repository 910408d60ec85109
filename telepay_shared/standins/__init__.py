"""Local HTTP stand-ins for external services, for tests and the dev stack only (never production)."""
