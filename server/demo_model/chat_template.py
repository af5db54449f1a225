"""The chat templates stored in the demo text models."""

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

# Youtu-VL-4B-Instruct's turn format: every turn opens with <|begin_of_text|> and the role on
# its own line and closes with <|end_of_text|>; a default system turn comes first; images sit
# in the user turn as <|vision_start|><|image_pad|><|vision_end|> right before their text.
# Written from that format (as the HF processor renders it), not copied from the model repo.
# Content given as a string (what vlserve passes, with mtmd's marker where images go) is used
# as is; the list branch mirrors the HF template for typed content. The tokenizer adds no BOS,
# so the template's own leading <|begin_of_text|> is the only one.
YOUTU_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|begin_of_text|>system\nYou are a helpful assistant.<|end_of_text|>\n"
    "{% endif %}"
    "<|begin_of_text|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}"
)
