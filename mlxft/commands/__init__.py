"""Click commands, one module each; heavy imports happen inside the command functions."""
