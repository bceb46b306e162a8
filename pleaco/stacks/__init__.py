"""Real apps: app secrets, node constraints and one-off jobs (compose stacks and volumes later)."""
