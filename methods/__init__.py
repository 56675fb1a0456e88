"""Data-efficiency methods, one module each; importing the package registers them."""
