"""eqmail package."""
