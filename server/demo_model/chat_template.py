"""The LLaVA-1.5 chat template stored in the demo text model."""

from __future__ import annotations

# No BOS in the template: mtmd_tokenize adds BOS itself (add_special), so emitting "<s>" here
# would give the model two of them.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}</s>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
