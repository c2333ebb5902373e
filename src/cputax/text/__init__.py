"""Text a request carries: tokenizers, the agent-shaped corpus, agent conversations."""
