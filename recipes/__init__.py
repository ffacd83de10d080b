"""Built-in recipes, shipped as package data and found by bare name (``bn_to_gn``)."""
