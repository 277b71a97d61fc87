#!/usr/bin/env python3
"""Sends N chat requests with a JSON schema (nested object, enums, an array,
bounded strings and integers) to a running server, sampled at temperature 1
with seeds 0..N-1, and checks every answer against the schema by hand (the
GPU machine has no jsonschema package). Prints one JSON line:
{"requests", "valid", "finished", "invalid_samples"}.

    python3 bench/constrained/validate.py http://127.0.0.1:8000 [N]
"""
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "kind": {"type": "string", "enum": ["animal", "plant", "place", "object", "person"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "origin": {
            "type": "object",
            "properties": {
                "country": {"type": "string", "maxLength": 24},
                "verified": {"type": "boolean"},
            },
            "required": ["country", "verified"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "rating", "tags", "origin"],
    "additionalProperties": False,
}


def valid(doc):
    if not isinstance(doc, dict) or set(doc) != set(SCHEMA["required"]):
        return False
    origin = doc["origin"]
    return (
        isinstance(doc["name"], str) and len(doc["name"]) <= 24
        and doc["kind"] in SCHEMA["properties"]["kind"]["enum"]
        and type(doc["rating"]) is int and 1 <= doc["rating"] <= 5
        and isinstance(doc["tags"], list) and len(doc["tags"]) <= 3
        and all(isinstance(t, str) and len(t) <= 12 for t in doc["tags"])
        and isinstance(origin, dict) and set(origin) == {"country", "verified"}
        and isinstance(origin["country"], str) and len(origin["country"]) <= 24
        and isinstance(origin["verified"], bool)
    )


def ask(url, seed):
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Describe thing number {seed} as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "entity", "schema": SCHEMA, "strict": True}},
        "temperature": 1.0, "seed": seed, "max_tokens": 600,
    }
    models = json.load(urllib.request.urlopen(url + "/v1/models"))
    body["model"] = models["data"][0]["id"]
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    choice = json.load(urllib.request.urlopen(req))["choices"][0]
    return choice["finish_reason"], choice["message"]["content"]


def main():
    url = sys.argv[1].rstrip("/")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda s: ask(url, s), range(n)))
    ok, finished, bad = 0, 0, []
    for reason, text in answers:
        finished += reason == "stop"
        try:
            good = valid(json.loads(text))
        except ValueError:
            good = False
        ok += good
        if not good and len(bad) < 3:
            bad.append(text[:300])
    print(json.dumps({"requests": n, "valid": ok, "finished": finished, "invalid_samples": bad}))
    sys.exit(0 if ok == n else 1)


if __name__ == "__main__":
    main()
