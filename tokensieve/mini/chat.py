"""sieve-mini's conversation format: SmolLM2's ChatML turns with `<image>` placeholders in the first one.

An image is one `<image>`; a video clip is one `<image>` per frame, each frame an image of its own. Where a
turn holds several images, each is numbered in text ("frame 3: <image>"): without the numbers the language
model has only its position ids to tell the frames apart, and the clips' training descriptions name frames
by these numbers ("the red star appears in frame 5").

Training formats strings with these functions; the processor's Jinja template below writes the same
text (a test checks they agree), so a model trained here is prompted at inference exactly as it learnt.
"""

IMAGE_TOKEN = "<image>"
END_OF_TURN = "<|im_end|>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{% set frame = namespace(number=0) %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set frame.number = frame.number + 1 %}"
    "{% if images > 1 %}frame {{ frame.number }}: {% endif %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def user_turn(question: str, images: int) -> str:
    """A user turn with `images` placeholders (a clip: one per frame), then the assistant's opening."""
    if images > 1:
        placeholders = "".join(f"frame {number}: {IMAGE_TOKEN}\n" for number in range(1, images + 1))
    else:
        placeholders = f"{IMAGE_TOKEN}\n" * images
    return f"<|im_start|>user\n{placeholders}{question}{END_OF_TURN}\n<|im_start|>assistant\n"


def assistant_answer(answer: str) -> str:
    return f"{answer}{END_OF_TURN}\n"
