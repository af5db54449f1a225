"""The chat templates stored in the demo text models."""

from __future__ import annotations

from server.engine.templates import GLM_4, YOUTU_VL

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

# Youtu-VL-4B-Instruct's turn format lives in the engine's template table, which serves it to
# GGUFs of that family; the demo model stores the same text.
YOUTU_VL_CHAT_TEMPLATE = YOUTU_VL

# GLM-4V's turn format, from the same table.
GLM_4V_CHAT_TEMPLATE = GLM_4
