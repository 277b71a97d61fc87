"""vLLM's utility endpoints, /tokenize, /detokenize and /version, against `tandem serve`
and `tandem local`, checked against what the official client's requests report."""
import re

import requests


def post(server, path, body):
    r = requests.post(f"{server.base}{path}", json=body, timeout=60)
    return r.status_code, r.json()


def test_version_names_the_release(server):
    r = requests.get(f"{server.base}/version", timeout=10)
    assert r.status_code == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", r.json()["version"]), r.text


def test_tokenize_counts_what_a_completion_uses(server, client, model):
    prompt = "The capital of France is"
    status, body = post(server, "/tokenize", {"model": model, "prompt": prompt})
    assert status == 200, body
    assert body["count"] == len(body["tokens"]) > 0
    assert body["token_strs"] is None
    models = client.models.list().data
    assert body["max_model_len"] == models[0].model_extra["max_model_len"]
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    assert completion.usage.prompt_tokens == body["count"]


def test_tokenize_messages_counts_what_a_chat_request_uses(server, client, model):
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    status, body = post(server, "/tokenize", {"model": model, "messages": messages})
    assert status == 200, body
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == body["count"]
    # Without the generation prompt the assistant's header is missing.
    status, shorter = post(
        server, "/tokenize", {"messages": messages, "add_generation_prompt": False}
    )
    assert status == 200, shorter
    assert shorter["count"] < body["count"]
    assert body["tokens"][: shorter["count"]] == shorter["tokens"]


def test_tokenize_with_tools_counts_what_a_chat_request_with_tools_uses(server, client, model):
    messages = [{"role": "user", "content": "What time is it in Oslo?"}]
    tools = [{"type": "function", "function": {
        "name": "get_time", "description": "The current time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    status, body = post(server, "/tokenize", {"messages": messages, "tools": tools})
    assert status == 200, body
    chat = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=1)
    assert chat.usage.prompt_tokens == body["count"]
    status, plain = post(server, "/tokenize", {"messages": messages})
    assert status == 200, plain
    assert plain["count"] < body["count"], "the tools are in the prompt"


def test_detokenize_inverts_tokenize(server):
    text = "Héllo wörld, 1 2 3 — ünïcode ✓"
    status, body = post(server, "/tokenize", {"prompt": text, "return_token_strs": True})
    assert status == 200, body
    assert len(body["token_strs"]) == body["count"]
    status, back = post(server, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200, back
    assert back == {"prompt": text}


def test_bad_input_names_the_field(server, model):
    cases = [
        ("/detokenize", {"tokens": [0, 10**9]}, 400, "tokens[1]"),
        ("/detokenize", {"tokens": "12"}, 400, "tokens"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/tokenize", {"prompt": ""}, 400, "prompt"),
        ("/tokenize", {"prompt": ["a"]}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "tools": []}, 400, "tools"),
        ("/tokenize", {"model": model + "-other", "prompt": "a"}, 404, "model"),
    ]
    for path, body, want_status, param in cases:
        status, answer = post(server, path, body)
        assert status == want_status, (path, body, answer)
        assert answer["error"]["param"] == param, (path, body, answer)
        assert answer["error"]["type"] == "invalid_request_error"
