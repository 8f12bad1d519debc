"""eqmail: a qmail/eQmail-compatible mail transfer agent, supervised and privilege-separated."""

__version__ = "0.1.0"
