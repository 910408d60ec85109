"""Test harnesses shared by the services' tests (local emulators and recorders); never imported in production."""
