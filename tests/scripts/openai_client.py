"""Talk to the swarm with the official `openai` Python client: one chat completion and one
streamed, printed as JSON {"chat": text, "streamed": text}.

usage: openai_client.py BASE_URL MODEL PROMPT MAX_TOKENS   (the API key from $OPENAI_API_KEY, if set)
"""
import json
import os
import sys

from openai import OpenAI


def main() -> None:
    base, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    client = OpenAI(base_url=base, api_key=os.environ.get("OPENAI_API_KEY", "unused"), max_retries=0, timeout=120)
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    parts = []
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    print(json.dumps({"chat": chat.choices[0].message.content, "streamed": "".join(parts),
                      "usage": chat.usage.completion_tokens}))


if __name__ == "__main__":
    main()
