"""Chat-template references: real-world-style templates x conversations, rendered by transformers.

transformers compiles templates with jinja2 (trim_blocks=True, lstrip_blocks=True, its own `tojson`
that keeps non-ASCII and does not HTML-escape, `raise_exception`, and `{% generation %}` blocks that
render their body unchanged), and passes the tokenizer's special tokens (bos_token, eos_token,
pad_token, unk_token as strings) plus add_generation_prompt as template variables.
"""
import os

from fixture_io import write_json

# Qwen2 / ChatML: default system prompt when the conversation has none.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3: bos_token, system split off with slicing, `| trim`, whitespace-control dashes.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Zephyr / SmolLM2 style: eos_token after every turn, generation prompt via loop.last.
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)

# Mistral: indented block tags (lstrip_blocks/trim_blocks matter), raise_exception on bad roles.
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# Feature mix: namespace() mutated in loops, attribute access (m.role), Python str methods
# (.strip(), .upper()), `tojson`, `trim`, filtered for-loop with loop.length/loop.index, `~`.
FEATURES = """{%- set ns = namespace(system='', n_user=0) %}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% set ns.system = ns.system + m.content.strip() %}{% endif %}
{%- endfor %}
{%- if ns.system %}<<SYS>>{{ ns.system | tojson }}<</SYS>>
{% endif %}
{%- for m in messages if m.role != 'system' %}
    {%- if m.role == 'user' %}
        {%- set ns.n_user = ns.n_user + 1 %}
[{{ ns.n_user }}/{{ loop.length }}] {{ m.role.upper() }}: {{ m.content | trim }}
    {% else %}
{{ m.role.upper() }}: {{ m.content.strip() }}{{ eos_token }}
    {% endif %}
    {%- if loop.last and not add_generation_prompt %}{{ '# turns=' ~ loop.index }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}ASSISTANT:{% endif %}"""

# SmolLM3 / TRL-training style: {% generation %} marks assistant tokens for assistant_only_loss.
GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

TEMPLATES = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "zephyr": ZEPHYR,
    "mistral": MISTRAL,
    "features": FEATURES,
    "generation_tags": GENERATION,
}


def sys_(c):
    return {"role": "system", "content": c}


def user(c):
    return {"role": "user", "content": c}


def asst(c):
    return {"role": "assistant", "content": c}


CONVERSATIONS = {
    "user_only": [user("Q: 17+25=")],
    "system_user": [sys_("You are a calculator."), user("What is 2+2?")],
    "multi_turn": [sys_("  Be brief.  "), user("Hi!"), asst("Hello. How can I help?"),
                   user("Add 3 and 4."), asst("7")],
    "user_assistant": [user("Q: 3+4="), asst(" 7")],
    "unicode_and_markup": [user("  Café 🤗 <b>bold</b> & \"quotes\" 'single'\n\n"),
                           asst("\tÜber — done.  ")],
    "system_with_quotes": [sys_("Say \"hi\" <now> & \u00e9t\u00e9."), user("ok")],
    # Error cases (for templates that validate roles).
    "two_users": [user("first"), user("second")],
    "tool_role": [user("call it"), {"role": "tool", "content": "42"}],
    "assistant_first": [asst("I speak first."), user("ok")],
}


def make_chat_templates(tok, ref_dir):
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
               "pad_token": tok.pad_token, "unk_token": tok.unk_token}
    cases = []
    for tname, tpl in TEMPLATES.items():
        for cname, conv in CONVERSATIONS.items():
            for agp in (False, True):
                case = {"template": tname, "conversation": cname, "add_generation_prompt": agp}
                try:
                    text = tok.apply_chat_template(conv, chat_template=tpl, tokenize=False,
                                                   add_generation_prompt=agp)
                except Exception as e:  # transformers raises TemplateError for raise_exception
                    case["error"] = {"type": type(e).__name__, "message": str(e)}
                else:
                    case["rendered"] = text
                    enc = tok.apply_chat_template(conv, chat_template=tpl, tokenize=True, return_dict=True,
                                                  add_generation_prompt=agp,
                                                  return_assistant_tokens_mask=tname == "generation_tags")
                    assert enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
                    case["ids"] = enc["input_ids"]
                    if "assistant_masks" in enc:
                        case["assistant_masks"] = enc["assistant_masks"]
                cases.append(case)
    errors = [c for c in cases if "error" in c]
    assert errors and all(c["template"] == "mistral" for c in errors), errors
    write_json(os.path.join(ref_dir, "chat_templates.json"), {
        "variables": special,
        "jinja_env": {"trim_blocks": True, "lstrip_blocks": True, "keep_trailing_newline": False},
        "templates": TEMPLATES,
        "conversations": CONVERSATIONS,
        "cases": cases,
    })
