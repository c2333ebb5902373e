"""Load profiles (TOML -> Scenario) and the prompts each request sends."""
