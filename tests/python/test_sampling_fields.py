"""Every sampling and structured-output field does what it says: the official `openai`
client against `tandem serve` and `tandem local` with the default model. Each test fails
if the server or the engine drops the field it is about."""
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

# The default model's vocabulary (SmolLM2-135M-Instruct).
VOCAB = 49152
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Long enough (16 tokens or more) that `tandem local` prefills it on the prefill worker.
LONG_PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def greedy(client, model, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return client.completions.create(model=model, prompt=prompt, temperature=0, **kwargs)


def test_n_gives_distinct_choices_that_a_seed_reproduces(client, model):
    args = dict(
        model=model, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
        temperature=1, seed=11, max_tokens=16,
    )
    first = client.chat.completions.create(n=3, **args)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) >= 2, texts
    again = client.chat.completions.create(n=3, **args)
    assert [c.message.content for c in again.choices] == texts
    # Choice 0 is what the seed alone gives; the prompt counts once in usage.
    alone = client.chat.completions.create(**args)
    assert alone.choices[0].message.content == texts[0]
    assert first.usage.prompt_tokens == alone.usage.prompt_tokens

    streamed, finishes = defaultdict(str), Counter()
    for chunk in client.chat.completions.create(n=3, stream=True, **args):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] += 1
    assert [streamed[i] for i in range(3)] == texts
    assert finishes == Counter({0: 1, 1: 1, 2: 1})


def first_token(client, model, prompt, bias=None):
    r = greedy(client, model, prompt, max_tokens=1, logprobs=0, logit_bias=bias or openai.NOT_GIVEN)
    return r.choices[0].logprobs.tokens[0]


def greedy_first_token_id(client, model, prompt):
    """The id of the token greedy decoding starts `prompt` with, found by banning halves of
    the vocabulary: the first token changes exactly when its id is among the banned."""
    start = first_token(client, model, prompt)
    lo, hi = 0, VOCAB
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if first_token(client, model, prompt, {str(i): -100 for i in range(lo, mid)}) != start:
            hi = mid
        else:
            lo = mid
    return lo


def test_logit_bias_bans_and_forces_a_token(client, model):
    prompt = "The capital of France is"
    start = first_token(client, model, prompt)
    token_id = greedy_first_token_id(client, model, prompt)
    assert first_token(client, model, prompt, {str(token_id): -100}) != start
    # +100 makes that token the greedy choice at every step, whatever the prompt.
    forced = greedy(client, model, "Once upon a time", max_tokens=4, logprobs=0, logit_bias={str(token_id): 100})
    assert forced.choices[0].logprobs.tokens == [start] * 4
    chat = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=3, logit_bias={str(token_id): 100},
    )
    assert chat.choices[0].message.content == start * 3


def test_min_p_of_one_is_greedy_even_at_temperature_two(client, model):
    args = dict(model=model, prompt="The capital of France is", max_tokens=16)
    want = client.completions.create(temperature=0, **args).choices[0].text
    seeds = (1, 2, 3)
    for seed in seeds:
        got = client.completions.create(temperature=2, seed=seed, extra_body={"min_p": 1.0}, **args)
        assert got.choices[0].text == want, f"seed {seed}"
    # Without min_p these seeds wander off greedy's path, so a dropped min_p fails above.
    wild = [client.completions.create(temperature=2, seed=seed, **args).choices[0].text for seed in seeds]
    assert any(text != want for text in wild)


def test_repetition_penalty_changes_a_repetitive_greedy_output(client, model):
    prompt = "1, 2, 3, 4, 5, 6, 7, 8,"
    plain = greedy(client, model, prompt, max_tokens=16, logprobs=0).choices[0]
    assert len(set(plain.logprobs.tokens)) < len(plain.logprobs.tokens), "greedy repeats tokens"
    penalized = greedy(client, model, prompt, max_tokens=16, extra_body={"repetition_penalty": 2.0})
    assert penalized.choices[0].text != plain.text
    disabled = greedy(client, model, prompt, max_tokens=16, extra_body={"repetition_penalty": 1.0})
    assert disabled.choices[0].text == plain.text


def test_batched_prompts_equal_separate_requests_in_order(client, model):
    # Greedy: a sampled token may flip on the last bits of a logit, which the CPU
    # engine does not keep identical across batch shapes.
    prompts = ["The capital of France is", "Once upon a time", LONG_PROMPT]
    args = dict(model=model, max_tokens=10, temperature=0, n=2)
    batched = client.completions.create(prompt=prompts, **args)
    assert [c.index for c in batched.choices] == list(range(6))
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, **args)
        assert [c.text for c in batched.choices[2 * p: 2 * p + 2]] == [c.text for c in alone.choices], prompt
        prompt_tokens += alone.usage.prompt_tokens
    assert batched.usage.prompt_tokens == prompt_tokens
    ids = client.completions.create(prompt=[[504, 3575, 282], [6307, 2056]], **args)
    assert [c.index for c in ids.choices] == [0, 1, 2, 3]
    assert ids.usage.prompt_tokens == 5


def test_echo_returns_the_prompt_and_its_logprobs(client, model):
    # Under `tandem local` a request with prompt logprobs is prefilled by the decode
    # worker itself, a token per step; the others may be prefilled remotely.
    prompt = "Rivers flow to the sea. Mountains rise to the sky. Forests grow in the valleys, and deserts"
    r = greedy(client, model, prompt, max_tokens=6, echo=True, logprobs=1)
    plain = greedy(client, model, prompt, max_tokens=6).choices[0].text
    assert greedy(client, model, prompt, max_tokens=6, echo=True).choices[0].text == prompt + plain

    choice, lp, k = r.choices[0], r.choices[0].logprobs, r.usage.prompt_tokens
    assert k >= 16
    assert choice.text == prompt + plain
    assert len(lp.tokens) == k + r.usage.completion_tokens
    assert "".join(lp.tokens[:k]) == prompt
    # The first prompt token has nothing before it; every other token has a real logprob,
    # no higher than the most likely alternative's.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for logprob, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert logprob is not None and logprob <= 0
        assert len(top) == 1 and max(top.values()) >= logprob - 1e-4
    # Each offset is where the token's text starts in the choice's text.
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert choice.text[offset: offset + len(token)] == token


def test_best_of_returns_the_candidate_with_the_highest_cumulative_logprob(client, model):
    args = dict(model=model, prompt="My favourite animal is", max_tokens=8, temperature=1, seed=21)
    # n=3 with the same seed samples the same three candidates best_of=3 does.
    candidates = client.completions.create(n=3, logprobs=0, **args).choices
    totals = [sum(c.logprobs.token_logprobs) for c in candidates]
    assert len({c.text for c in candidates}) >= 2, [c.text for c in candidates]
    winner = candidates[totals.index(max(totals))]

    best = client.completions.create(best_of=3, logprobs=0, **args)
    assert len(best.choices) == 1
    assert best.choices[0].text == winner.text
    assert sum(best.choices[0].logprobs.token_logprobs) == pytest.approx(max(totals), abs=1e-3)
    # Logprobs rank the candidates but are shown only when asked for.
    hidden = client.completions.create(best_of=3, **args)
    assert hidden.choices[0].text == winner.text
    assert hidden.choices[0].logprobs is None


def test_unknown_and_unsupported_fields_are_refused_by_name(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, extra_body={"temprature": 0.5})
    assert e.value.body["param"] == "temprature"
    assert "Unknown field `temprature`" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, modalities=["text", "audio"])
    assert e.value.body["param"] == "modalities"
    assert "not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="hi", max_tokens=2, logit_bias={str(VOCAB): 5})
    assert e.value.body["param"] == "logit_bias"
    # Fields that change nothing observable are accepted.
    r = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False,
    )
    assert r.choices[0].message.content is not None


ENTITY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"type": "string", "enum": ["animal", "plant", "place", "object", "person"]},
        "size": {"type": "string", "enum": ["small", "medium", "large"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "origin": {
            "type": "object",
            "properties": {
                "country": {"type": "string", "maxLength": 24},
                "known_since": {"type": "integer", "minimum": 0, "maximum": 2100},
                "verified": {"type": "boolean"},
            },
            "required": ["country", "known_since", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "size", "rating", "tags", "origin"],
    "additionalProperties": False,
}
SUBJECTS = [
    "a red fox", "the Eiffel Tower", "an oak tree", "a violin", "Marie Curie", "the Sahara desert",
    "a golden retriever", "a sunflower", "a mechanical watch", "Mount Fuji", "a blue whale",
    "a bonsai tree", "the Great Wall of China", "a teapot", "Ada Lovelace", "a honeybee",
    "a cactus", "a bicycle", "Venice", "an octopus",
]


def test_json_schema_output_validates_on_varied_prompts(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "entity", "schema": ENTITY_SCHEMA, "strict": True}}

    def ask(i_subject):
        i, subject = i_subject
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Describe {subject} as a JSON object."}],
            response_format=response_format, temperature=0.8, seed=i, max_tokens=600,
        ).choices[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        choices = list(pool.map(ask, enumerate(SUBJECTS)))
    for subject, choice in zip(SUBJECTS, choices):
        text = choice.message.content
        assert choice.finish_reason == "stop", f"{subject}: {text!r}"
        jsonschema.validate(json.loads(text), ENTITY_SCHEMA)


def test_json_object_output_parses_as_an_object(client, model):
    # Prompts the small model answers briefly: asked for a book it describes forever.
    for prompt in [
        "Give me a JSON object with the name and age of a person.",
        'Return a JSON object with the keys "city" and "country" for Paris.',
    ]:
        args = dict(model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=256)
        r = client.chat.completions.create(response_format={"type": "json_object"}, **args)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)
        # Unconstrained, the model wraps its JSON in code fences and prose, so a dropped
        # response_format fails above.
        free = client.chat.completions.create(**args).choices[0].message.content
        with pytest.raises(json.JSONDecodeError):
            json.loads(free)


def test_guided_choice_and_regex_constrain_the_text(client, model):
    choices = ["sunny", "rainy", "snowy"]
    for seed in range(4):
        r = client.completions.create(
            model=model, prompt="Tomorrow the weather will be", max_tokens=8, temperature=1, seed=seed,
            extra_body={"guided_choice": choices},
        )
        assert r.choices[0].text in choices
    r = client.completions.create(
        model=model, prompt="Call me at", max_tokens=16, temperature=1, seed=3,
        extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"},
    )
    text = r.choices[0].text
    assert len(text) == 8 and text[3] == "-" and (text[:3] + text[4:]).isdigit(), text
