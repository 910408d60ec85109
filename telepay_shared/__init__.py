"""TelePay shared core: the one copy of config, database, tokens, Cloud Tasks, ChangeNOW and web code."""
