"""Our prompt templates as Jinja chat templates, the form `transformers` and vLLM render messages in.

A checkpoint saved here carries the template of its `conversation.Template`, so another engine
given the same OpenAI-style messages builds the prompt `videollava serve` builds, character for
character: the system text (the template's own unless the messages give one, system messages
joined by newlines), then each user turn as `user_turn` writes it (a message's text parts joined
by newlines; its videos' then its images' placeholders and a newline in front, unless the text
places its own), each answer stripped and closed by the template's second separator, and the open
assistant turn. Content may be a string or a list of parts (`{"type": "text" | "image" | "video"
| "image_url" | "video_url"}`), as vLLM's "openai" content format passes them.
"""

from __future__ import annotations

import json

from videollava.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from videollava.data.conversation import Template, get_template

# `{{ text(message) }}` cannot be a macro with a return value in Jinja, so every use renders the
# message's text parts into a namespace first. `__SYSTEM__`-style names are filled in below.
_TWO_STYLE = """\
{%- set sys = namespace(given=false, parts=[]) -%}
{%- for message in messages -%}
{%- if message['role'] in ['system', 'developer'] -%}
{%- set t = namespace(parts=[]) -%}
{%- if message['content'] is string -%}{%- set t.parts = [message['content']] -%}
{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}\
{%- set t.parts = t.parts + [part['text']] -%}{%- endif -%}{%- endfor -%}{%- endif -%}
{%- set sys.given = true -%}{%- set sys.parts = sys.parts + [t.parts | join('\\n')] -%}
{%- endif -%}
{%- endfor -%}
{%- set system = sys.parts | join('\\n') if sys.given else __SYSTEM__ -%}
{{- bos_token -}}
{%- if system -%}{{- system ~ __SEP__ -}}{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] in ['user', 'assistant'] -%}
{%- set t = namespace(parts=[], images=0, videos=0) -%}
{%- if message['content'] is string -%}{%- set t.parts = [message['content']] -%}
{%- else -%}{%- for part in message['content'] -%}
{%- if part['type'] == 'text' -%}{%- set t.parts = t.parts + [part['text']] -%}
{%- elif part['type'] in ['image', 'image_url'] -%}{%- set t.images = t.images + 1 -%}
{%- elif part['type'] in ['video', 'video_url'] -%}{%- set t.videos = t.videos + 1 -%}
{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- set text = t.parts | join('\\n') -%}
{%- if message['role'] == 'user' -%}
{%- if (t.images + t.videos) > 0 and __IMAGE__ not in text and __VIDEO__ not in text -%}
{%- set text = __VIDEO__ * t.videos ~ __IMAGE__ * t.images ~ '\\n' ~ text -%}
{%- endif -%}
{{- __USER__ ~ ': ' ~ text ~ __SEP__ -}}
{%- else -%}
{{- __ASSISTANT__ ~ ': ' ~ (text | trim) ~ __SEP2__ -}}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- __ASSISTANT__ ~ ':' -}}{%- endif -%}
"""


def chat_template(template: str | Template) -> str:
    """The Jinja chat template that renders `template`'s generation prompts.

    Only the "two" style has one: the "plain" style of stage-1 captioning is no chat.
    """
    template = get_template(template)
    if template.style != "two":
        raise ValueError(f"template {template.name!r} ({template.style} style) has no chat form")
    values = {
        "__SYSTEM__": template.system,
        "__SEP__": template.sep,
        "__SEP2__": template.sep2,
        "__USER__": template.roles[0],
        "__ASSISTANT__": template.roles[1],
        "__IMAGE__": IMAGE_PLACEHOLDER,
        "__VIDEO__": VIDEO_PLACEHOLDER,
    }
    text = _TWO_STYLE
    for name, value in values.items():
        text = text.replace(name, json.dumps(value))  # a JSON string is a Jinja string literal
    return text
