"""User surfaces: the CLI, chat, batch and its executors, eval, the HTML audit view. Nothing imports them."""
