"""Tool calling with the official `openai` client, against `tandem serve` and `tandem local`.

The default model's template knows nothing of tools, so the server renders them in the
Hermes style and reads `<tool_call>` blocks back. `tool_choice="required"` constrains the
output to calls, so even a 135M model's arguments parse and validate against the schema.
"""
import json

import jsonschema
import openai
import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def assert_valid_call(name, arguments):
    """A call names an offered function and its arguments validate against its parameters."""
    assert name in PARAMETERS, name
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


def tool_results(calls):
    """A `tool` message answering each call, as an application would send them."""
    return [
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21, "sky": "clear"})}
        for call in calls
    ]


def accumulate(stream):
    """Content, tool calls and finish reason from chunks, the way applications accumulate them."""
    content, calls, finish = [], {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content.append(delta.content or "")
        for d in delta.tool_calls or []:
            if d.index not in calls:
                # The first delta of a call carries its id, type and name.
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "type": "function",
                                  "function": {"name": d.function.name, "arguments": ""}}
            else:
                assert d.id is None and d.function.name is None, d
            calls[d.index]["function"]["arguments"] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [calls[i] for i in sorted(calls)], finish


def test_required_round_trip(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls
    ids = set()
    for call in choice.message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_") and call.id not in ids
        ids.add(call.id)
        assert_valid_call(call.function.name, call.function.arguments)

    # The application runs the calls and sends the assistant turn back as it got it.
    calls = [c.model_dump() for c in choice.message.tool_calls]
    messages = QUESTION + [choice.message] + tool_results(calls)
    final = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40,
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None
    assert answer.message.content.strip()
    assert answer.finish_reason in ("stop", "length")


def test_required_round_trip_streaming(client, model):
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120,
        stream=True,
    )
    content, calls, finish = accumulate(stream)
    assert finish == "tool_calls"
    assert content == ""
    assert calls
    for call in calls:
        assert call["id"].startswith("call_")
        assert_valid_call(call["function"]["name"], call["function"]["arguments"])

    whole = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120,
    )
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls
    ]

    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": calls}] + tool_results(calls)
    content, calls, finish = accumulate(client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40,
        stream=True,
    ))
    assert content.strip()
    assert calls == []
    assert finish in ("stop", "length")


def test_tool_results_are_answered_in_text(client, model):
    """The second half of a round trip, whatever the first produced: the assistant's
    call and the `tool` result are accepted, rendered, and answered."""
    calls = [{"id": "call_7", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]
    messages = QUESTION + [{"role": "assistant", "content": None, "tool_calls": calls}] + tool_results(calls)
    args = dict(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    r = client.chat.completions.create(**args)
    assert r.choices[0].message.content.strip()
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")
    without_result = client.chat.completions.create(**{**args, "messages": messages[:-1]})
    assert r.usage.prompt_tokens > without_result.usage.prompt_tokens
    content, streamed_calls, finish = accumulate(client.chat.completions.create(stream=True, **args))
    assert (content, streamed_calls, finish) == (r.choices[0].message.content, [], r.choices[0].finish_reason)


def test_auto_text_streams_as_it_answers_whole(client, model):
    args = dict(model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=40)
    whole = client.chat.completions.create(**args)
    content, calls, finish = accumulate(client.chat.completions.create(stream=True, **args))
    message = whole.choices[0].message
    assert content == (message.content or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        (c.function.name, c.function.arguments) for c in message.tool_calls or []
    ]
    assert finish == whole.choices[0].finish_reason


def test_a_named_function_is_the_one_called_once(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=120,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1
    assert calls[0].function.name == "get_time"
    assert_valid_call("get_time", calls[0].function.arguments)


def test_tool_choice_none_answers_in_text(client, model):
    r = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=24,
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    # Tools are not rendered under "none": the prompt is the plain conversation's.
    plain = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_auto_offers_the_tools_in_the_prompt(client, model):
    offered = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=8,
    )
    plain = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8)
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 50
    assert offered.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": {"type": "function", "function": {"name": "f"}}}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_stock"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_fields_are_400s_naming_the_field(client, model, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, **fields)
    assert e.value.body["param"] == param, e.value.body


def test_a_tool_message_needs_its_call_id(client, model):
    messages = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "21 degrees"},
    ]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=4)
    assert e.value.body["param"] == "messages[2].tool_call_id"
