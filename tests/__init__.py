"""mlxft tests; fast by default, `-m slow` for the real-model tier."""
