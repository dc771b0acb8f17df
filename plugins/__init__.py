"""retraind's built-in plugins: each module registers through the `retraind` entry-point group, exactly like a
third-party plugin, and its defaults are `trylast` so a user's plugin can replace them."""
