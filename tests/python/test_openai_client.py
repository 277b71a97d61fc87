"""The official `openai` Python client against a real `tandem serve` with the default model."""
import openai
import pytest
import requests

from conftest import Server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_lists_the_served_model(client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == "SmolLM2-135M-Instruct"
    assert models[0].object == "model"


def test_chat_answers_paris(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 32
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion(client, model):
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8


def test_chat_stream_equals_non_stream_at_temperature_zero(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_stream_equals_non_stream(client, model):
    args = dict(model=model, prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**args)
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **args) if c.choices)
    assert text == whole.choices[0].text


def test_stop_string_ends_the_text_before_it(client, model):
    args = dict(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    whole = client.chat.completions.create(**args).choices[0].message.content
    assert "Paris" in whole
    r = client.chat.completions.create(stop=["Paris"], **args)
    assert r.choices[0].message.content == whole[: whole.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, model):
    args = dict(model=model, prompt="My favourite colour is", max_tokens=16, temperature=0.9, seed=1234)
    a = client.completions.create(**args).choices[0].text
    b = client.completions.create(**args).choices[0].text
    assert a == b


def test_logprobs(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for token in content:
        assert token.logprob <= 0
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob, abs=1e-4)


def test_errors_map_to_client_exceptions(client, model, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    r = requests.post(f"{server.base}/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert requests.get(f"{server.base}/health").status_code == 200


@pytest.mark.parametrize("kind", ["serve", "local"])
def test_sigterm_exits_zero(kind):
    s = Server(kind)
    s.wait_ready()
    assert s.stop() == 0
