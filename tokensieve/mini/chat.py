"""sieve-mini's conversation format: SmolLM2's ChatML turns with an `<image>` placeholder in the first one.

Training formats strings with these functions; the processor's Jinja template below writes the same
text (a test checks they agree), so a model trained here is prompted at inference exactly as it learnt.
"""

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_turn(question: str, with_image: bool) -> str:
    """A user turn followed by the assistant's opening, ready for the answer."""
    image = f"{IMAGE_TOKEN}\n" if with_image else ""
    return f"<|im_start|>user\n{image}{question}{END_OF_TURN}\n<|im_start|>assistant\n"


def assistant_answer(answer: str) -> str:
    return f"{answer}{END_OF_TURN}\n"
